"""The compiled (CUDA) mode of the drloc Triton kernels builds, without a GPU: each kernel is compiled from source to
sm_90 PTX and cubin with Triton's bundled ptxas, for the dtypes and the integer specialisations (size 1 becomes a
compile-time constant) the launchers produce. The interpreter (tests/test_kernels_drloc.py) checks the numbers but
not the compiled frontend: uint32 hash arithmetic typing, constexpr branches, global/helper access, atomics.
Running the compiled kernels still needs a GPU (the same test file parametrises over 'cuda' when one is present).
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
compiler = pytest.importorskip("triton.compiler")
backends = pytest.importorskip("triton.backends.compiler")

from kernels.drloc_reference import COUNTER_MUL  # noqa: E402
from kernels.triton_runtime import _load  # noqa: E402

TARGET = backends.GPUTarget("cuda", 90, 32)


def _compile(fn, args: dict, constexprs: dict):
    """args: name -> '*fp32'-style pointer type or an example int. Specialised as a launch does: an int equal to 1
    becomes a constant, ints divisible by 16 and (torch-allocated, 16-byte aligned) pointers get divisibility 16."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for name, value in args.items():
        index = (fn.arg_names.index(name),)
        if isinstance(value, str):
            signature[name] = value
            attrs[index] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
            if value % 16 == 0:
                attrs[index] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    source = compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    kernel = triton.compile(source, target=TARGET)
    assert "cubin" in kernel.asm and len(kernel.asm["cubin"]) > 0
    return kernel


@pytest.fixture(scope="module")
def compiled_kernels():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton's NVIDIA backend is not installed")
    return _load("kernels.drloc_triton", False)


@pytest.mark.parametrize("sizes", [dict(rows=4096, m=64, k=8), dict(rows=1, m=1, k=1), dict(rows=35, m=7, k=5)])
@pytest.mark.parametrize("use_abs,float_targets,key_in_memory", [(True, True, False), (False, False, True)])
def test_pairs_and_targets_kernel_compiles(compiled_kernels, sizes, use_abs, float_targets, key_in_memory):
    _compile(compiled_kernels._pairs_and_targets_kernel,
             dict(pi_ptr="*i64", pj_ptr="*i64", tgt_ptr="*fp32" if float_targets else "*i64", seed_key=2 ** 32 - 5,
                  key_ptr="*i64", **sizes),
             dict(KEY_IN_MEMORY=key_in_memory, USE_ABS=use_abs, FLOAT_TARGETS=float_targets,
                  COUNTER_MUL=COUNTER_MUL, BLOCK=256))


@pytest.mark.parametrize("dtype,acc", [("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")])
@pytest.mark.parametrize("sizes", [dict(rows=65536, m=64, N=64, H=512), dict(rows=1, m=1, N=1, H=1)])
def test_head_kernels_compile(compiled_kernels, dtype, acc, sizes):
    acc_tl = tl.float64 if acc == "fp64" else tl.float32
    block = dict(BLOCK_R=16, BLOCK_H=128 if sizes["H"] > 1 else 1)
    _compile(compiled_kernels._gather_add_bias_relu_kernel,
             dict(p_ptr=f"*{acc}", pi_ptr="*i64", pj_ptr="*i64", b1_ptr=f"*{dtype}", h_ptr=f"*{dtype}", **sizes),
             dict(ACC=acc_tl, **block))
    _compile(compiled_kernels._scatter_pairs_kernel,
             dict(dh_ptr=f"*{dtype}", h_ptr=f"*{dtype}", pi_ptr="*i64", pj_ptr="*i64", dp_ptr=f"*{acc}", **sizes),
             block)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype,acc", [("bf16", "fp32"), ("fp64", "fp64")])
def test_pair_loss_kernel_compiles(compiled_kernels, mode, dtype, acc):
    acc_tl = tl.float64 if acc == "fp64" else tl.float32
    n = 1 if mode == 0 else 15
    _compile(compiled_kernels._pair_loss_kernel,
             dict(x_ptr=f"*{dtype}", tgt_ptr="*fp32" if mode == 0 else "*i64", loss_ptr=f"*{acc}",
                  grad_ptr=f"*{acc}", rows=65536, n=n, denom=65536 * (2 if mode == 0 else 1)),
             dict(MODE=mode, ACC=acc_tl, BLOCK_R=64, BLOCK_N=max(2, triton.next_power_of_2(n))))
