"""The fused counter hash (loaders/transforms/rng.py, kernels/counter_hash_triton.py) against its int64 PyTorch
formulation: the same bits on odd sizes, the draws of the code it replaced (a committed snapshot), and one op per
call where a GPU launches kernels.

Triton runs in its interpreter on the CPU (TRITON_INTERPRET=1 for the duration of a test); on a CUDA machine the
compiled kernels are compared too.
"""
from __future__ import annotations

import pytest
import torch

from loaders.transforms import rng

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ODD = [(0, 1), (1, 1), (7, 3), (33, 400), (257, 5)]


@pytest.fixture(params=DEVICES)
def triton_hash(request):
    """The Triton launchers for each device here: the CPU through the interpreter, CUDA compiled."""
    triton = pytest.importorskip("triton")
    from kernels.triton_runtime import load_kernels

    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = request.param == "cpu"
        device = torch.device(request.param)
        yield load_kernels("kernels.counter_hash_triton", device, "test"), device


def _index(b: int, device, seed: int = 0) -> torch.Tensor:
    """Sample indices with the awkward ones in: beyond 32 bits, negative, zero."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 2 ** 40, (b,), generator=g, dtype=torch.int64)
    index[:3] = torch.tensor([0, -9, 2 ** 33 + 5])[:b]
    return index.to(device)


@pytest.mark.parametrize("b,n", ODD)
def test_triton_hash_equals_the_int64_formulation(triton_hash, b, n):
    kernels, device = triton_hash
    index = _index(b, device, seed=b)
    repeat = (torch.arange(b, device=device) * 7) % 3
    for base in (0, 1, 0x7FFFFFFF, 0xDEADBEEF, rng.key_base(2 ** 40 + 5, 2 ** 33, 0x4D4958)):
        for rep in (None, repeat):
            assert torch.equal(kernels.counter_keys(index, base, rep), rng._keys_plain(index, base, rep))
    keys = rng._keys_plain(index, 12345, repeat)
    for slot in (0, 9, 65, 2 ** 31 + 3):
        assert torch.equal(kernels.counter_uniform(keys, slot, n), rng._uniform_plain(keys, slot, n))
        for high in (1, 2, 10, 25, 401, 2 ** 20 + 7):
            assert torch.equal(kernels.counter_uniform(keys, slot, n, high), rng._randint_plain(keys, slot, high, n))


def test_fused_ops_give_the_draws_of_the_code_they_replaced():
    """Values recorded from the all-PyTorch rng.py before the fused ops (keys, uniform bits, integer draws)."""
    keys = rng.keys_for(12345, 7, torch.tensor([0, 1, 2, 3, 2 ** 33 + 5, -9]), 3, torch.tensor([0, 1, 2, 0, 5, 1]))
    assert keys.tolist() == [2617846037, 3342160210, 822720529, 2086697976, 1800848339, 1368349533]
    assert torch.equal(keys, rng.repeat_keys(rng.sample_keys(12345, 7, torch.tensor([0, 1, 2, 3, 2 ** 33 + 5, -9]),
                                                             3), torch.tensor([0, 1, 2, 0, 5, 1])))
    assert (rng.uniform(keys, 9, 3) * 2 ** 24).to(torch.int64).tolist() == [
        [2443162, 8885358, 1613144], [10709994, 16396155, 493783], [3553335, 2001928, 4525296],
        [6761160, 1986018, 2860534], [3268370, 4575530, 11584599], [13485347, 7745948, 3093190]]
    assert rng.randint(keys, 200, 10, 2).tolist() == [[2, 4], [2, 7], [9, 9], [3, 6], [0, 2], [4, 6]]


@pytest.mark.parametrize("b,n", ODD)
def test_fused_ops_equal_the_plain_forms_and_are_one_op_each(b, n):
    from bench.counting import DeviceWork

    index = _index(b, "cpu", seed=3)
    repeat = torch.arange(b) % 2
    keys = rng.keys_for(5, 2, index, 1, repeat)
    assert torch.equal(keys, rng._keys_plain(index, rng.key_base(5, 2, 1), repeat))
    assert torch.equal(rng.uniform(keys, 40, n), rng._uniform_plain(keys, 40, n))
    assert torch.equal(rng.randint(keys, 3, 17, n), rng._randint_plain(keys, 3, 17, n))
    meta = torch.device("meta")
    with DeviceWork() as work:                    # the shapes on a device without data, one counted op each
        k = rng.keys_for(5, 2, index.to(meta), 1, repeat.to(meta))
        u, r = rng.uniform(k, 40, n), rng.randint(k, 3, 17, n)
    assert (k.shape, u.shape, u.dtype, r.shape, r.dtype) == ((b,), (b, n), torch.float32, (b, n), torch.int64)
    assert work.by_op == {"_to_copy": 2, "counter_keys": 1, "counter_uniform": 1, "counter_randint": 1}
