"""The fused drloc kernels (kernels/drloc_triton.py via kernels/dispatch.py) against the PyTorch reference
(kernels/drloc_reference.py): pair sampling bit for bit, the head + loss forward and backward by dtype tolerance,
the backward's algebra by float64 gradcheck. Triton runs in its interpreter on the CPU (TRITON_INTERPRET=1, set by
the `interpret` and `device` fixtures for the duration of each test; kernels/triton_runtime.py reads it at launch,
so import order within a pytest process does not matter). On a CUDA machine `device` adds the compiled path.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from kernels import dispatch
from kernels import drloc_reference as ref
from kernels.drloc_head import TorchPairOps, fused_pair_loss
from kernels.triton_runtime import TritonUnavailableError, load_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-10}


@pytest.fixture
def interpret():
    """Triton's interpreter on for this test (knob and env var restored after)."""
    triton = pytest.importorskip("triton")
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        yield


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device the Triton path can run on here: the CPU through the interpreter, CUDA compiled."""
    triton = pytest.importorskip("triton")
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")   # TF32 (if something else enabled it) would swamp 1e-5
    try:
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = request.param == "cpu"
            yield torch.device(request.param)
    finally:
        torch.set_float32_matmul_precision(precision)


def _kernels(device):
    return load_kernels("kernels.drloc_triton", torch.device(device), "test")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """fp32/fp64: elementwise, rtol plus an atol scaled to the tensor's magnitude (sums of many terms cancel);
    bf16: relative norm of the difference (single elements can round to the other side of a bf16 step)."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), what
    tol = TOL[dtype]
    if dtype == torch.bfloat16:
        assert _rel(actual, expected) <= tol, f"{what}: rel err {_rel(actual, expected):.3g} > {tol}"
    else:
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale, msg=what)


# ----------------------------------------------------------------------------------------------- sampling
SAMPLING_SHAPES = [(3, 5, 4, True, False), (7, 1, 1, False, True), (33, 8, 64, False, False),
                   (2, 13, 3, True, True), (1, 2, 17, False, True)]


@pytest.mark.parametrize("batch,k,m,use_abs,float_targets", SAMPLING_SHAPES)
def test_pairs_and_targets_kernel_equals_torch_twin(device, batch, k, m, use_abs, float_targets):
    for seed in (0, 12345, 2 ** 40 + 7):
        got = dispatch.drloc_pairs_and_targets(batch, k, m, use_abs, seed, device, "triton", float_targets)
        want = ref.counter_pairs_and_targets(batch, k, m, use_abs, seed, device, float_targets)
        for g, w, name in zip(got, want, ("p_i", "p_j", "target")):
            assert g.dtype == w.dtype and g.shape == w.shape, name
            assert torch.equal(g, w), f"{name} differs for seed {seed}"
        # the targets are the reference offsets of those positions (METHODS.md C)
        offsets = ref.pair_offset_targets(got[0], got[1], k, use_abs)
        assert torch.equal(got[2], offsets.to(got[2].dtype))
        # a device-tensor seed (CUDA-graph friendly) draws the same pairs on both backends
        seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
        for backend in ("triton", "torch"):
            from_tensor = dispatch.drloc_pairs_and_targets(batch, k, m, use_abs, seed_t, device, backend,
                                                           float_targets)
            assert all(torch.equal(a, b) for a, b in zip(from_tensor, want)), backend


def test_positions_are_a_function_of_seed_image_and_pair_only():
    p_big, q_big = ref.counter_pair_positions(10, 6, 8, seed=3)
    p_small, q_small = ref.counter_pair_positions(4, 6, 5, seed=3)
    assert torch.equal(p_big[:4, :5], p_small) and torch.equal(q_big[:4, :5], q_small)
    assert ref.drloc_seed_key(-5) == int(ref.drloc_seed_key(torch.tensor(-5)))
    for other in (4, 3 + 2 ** 32, 3 + 2 ** 62):     # high seed bits count too
        p_other, _ = ref.counter_pair_positions(10, 6, 8, seed=other)
        assert (p_other != p_big).float().mean() > 0.9


@pytest.mark.parametrize("k", [5, 8])
def test_positions_uniform_over_grid_and_independent(k):
    n = k * k
    p_i, p_j = ref.counter_pair_positions(4000, k, 64, seed=2024)
    assert int(p_i.min()) >= 0 and int(max(p_i.max(), p_j.max())) < n
    for p in (p_i, p_j):   # uniform over the k*k cells
        counts = torch.bincount(p.flatten(), minlength=n).numpy()
        assert stats.chisquare(counts).pvalue > 1e-3

    def independent(a: torch.Tensor, b: torch.Tensor) -> float:
        table = torch.bincount((a * n + b).flatten(), minlength=n * n).reshape(n, n).numpy()
        return stats.chi2_contingency(table).pvalue
    assert independent(p_i, p_j) > 1e-3                  # p_i vs p_j of the same pair
    assert independent(p_i[:, :-1], p_i[:, 1:]) > 1e-3   # neighbouring pairs of one image
    assert independent(p_i[:-1], p_i[1:]) > 1e-3         # same pair slot of neighbouring images
    # the test can fail: a sampler correlated across the pair is caught
    coin = torch.randint(0, 2, p_i.shape, generator=torch.Generator().manual_seed(0))
    assert independent(p_i, (p_i + coin) % n) < 1e-6
    # offsets: P(|Δrow| = d) = (2 (k - d) - [d == 0] k) / k^2 for independent uniform rows
    drow = ref.pair_offset_targets(p_i, p_j, k, use_abs=True)[..., 0].flatten()
    expected = np.array([(2 * (k - d) - (k if d == 0 else 0)) / k ** 2 for d in range(k)]) * drow.numel()
    assert stats.chisquare(torch.bincount(drow, minlength=k).numpy(), expected).pvalue > 1e-3


# ------------------------------------------------------------------------------------------ head + loss
def _problem(batch, k, m, c, h, mode, use_abs, dtype, device, seed=0, strided=True):
    """Random tokens (a CLS-dropping strided view), head weights (nn.Linear layout) and pairs/targets."""
    g = torch.Generator().manual_seed(seed)
    n_tok = k * k
    n = 2 if mode == "l1" else (k if use_abs else 2 * k - 1)
    tokens = torch.randn(batch, n_tok + int(strided), c, generator=g)[:, int(strided):]
    w1 = torch.randn(h, 2 * c, generator=g) / math.sqrt(2 * c)
    b1 = torch.randn(h, generator=g) * 0.3
    w2 = torch.randn(h, h, generator=g) / math.sqrt(h)
    b2 = torch.randn(h, generator=g) * 0.3
    outs = [(torch.randn(n, h, generator=g) * (2.0 / math.sqrt(h)), torch.randn(n, generator=g))
            for _ in range(1 if mode == "l1" else 2)]
    w3 = torch.randn(h, h, generator=g) / math.sqrt(h)      # ce/cbr: C's shared third Linear (layers.4)
    b3 = torch.randn(h, generator=g) * 0.3
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    tokens = cast(tokens)
    shared = (None, None) if mode == "l1" else (cast(w3), cast(b3))
    params = dispatch.HeadParams(cast(w1), cast(b1), cast(w2), cast(b2), tuple((cast(w), cast(b)) for w, b in outs),
                                 *shared)
    p_i, p_j, target = ref.counter_pairs_and_targets(batch, k, m, use_abs, seed, device, mode == "l1")
    return tokens, params, p_i, p_j, target


def _leaves(tokens, params):
    shared = [] if params.w3 is None else [params.w3, params.b3]
    return [tokens, params.w1, params.b1, params.w2, params.b2] + shared + [t for pair in params.out for t in pair]


def _names(params):
    shared = [] if params.w3 is None else ["w3", "b3"]
    return ["tokens", "w1", "b1", "w2", "b2"] + shared + [f"{w}_out{i}" for i in range(len(params.out))
                                                          for w in ("w", "b")]
# (B, k, m, C, H): odd C, k = 1, m = 1, a larger batch
HEAD_SHAPES = [(2, 3, 5, 7, 12), (3, 1, 4, 5, 6), (4, 4, 1, 9, 16), (64, 4, 16, 6, 24)]


def _loss_and_grads(backend, tokens, params, p_i, p_j, target, mode):
    loss = dispatch.drloc_pair_loss(tokens, p_i, p_j, target, params, mode, backend)
    return loss, torch.autograd.grad(loss, _leaves(tokens, params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,use_abs", [("l1", True), ("ce", False), ("cbr", True), ("cbr", False)])
@pytest.mark.parametrize("shape", HEAD_SHAPES)
def test_triton_head_matches_reference_forward_and_backward(device, shape, mode, use_abs, dtype):
    problem = _problem(*shape, mode, use_abs, dtype, device, seed=sum(shape))
    loss_ref, grads_ref = _loss_and_grads("torch", *problem, mode)
    loss, grads = _loss_and_grads("triton", *problem, mode)
    assert loss.dtype == torch.float32 and loss.shape == ()
    _assert_close(loss, loss_ref, dtype, "loss")
    assert len(grads) == len(_names(problem[1]))
    for g, g_ref, name in zip(grads, grads_ref, _names(problem[1])):
        assert g.dtype == dtype, name
        _assert_close(g, g_ref, dtype, f"d loss / d {name}")


@pytest.mark.parametrize("mode,use_abs", [("l1", False), ("ce", True), ("cbr", False)])
@pytest.mark.parametrize("shape", HEAD_SHAPES)
def test_fused_torch_path_matches_reference(shape, mode, use_abs):
    """The autograd.Function with the torch twins of the kernels (project once, gather-add, closed-form loss
    gradients, index_add scatter) equals autograd through the plain reference."""
    tokens, params, p_i, p_j, target = _problem(*shape, mode, use_abs, torch.float32, "cpu", seed=1)
    loss_ref, grads_ref = _loss_and_grads("torch", tokens, params, p_i, p_j, target, mode)
    loss = fused_pair_loss(tokens, p_i, p_j, target, params.w1, params.b1, params.w2, params.b2,
                           list(params.out), mode, ops=TorchPairOps, shared=params.shared)
    grads = torch.autograd.grad(loss, _leaves(tokens, params))
    _assert_close(loss, loss_ref, torch.float32, "loss")
    for g, g_ref, name in zip(grads, grads_ref, _names(params)):
        _assert_close(g, g_ref, torch.float32, f"d loss / d {name}")


@pytest.mark.parametrize("mode,use_abs", [("l1", True), ("ce", False), ("cbr", True)])
def test_gradcheck_float64_and_triton_against_it(device, mode, use_abs):
    """Analytic backward of the Function (torch ops) vs finite differences in float64, then the Triton kernels
    (fp64 accumulation) against that backward to 1e-10."""
    tokens, params, p_i, p_j, target = _problem(2, 3, 4, 3, 5, mode, use_abs, torch.float64, "cpu", seed=5)
    leaves = _leaves(tokens, params)
    n_out = len(params.out)
    names = _names(params)

    def loss_of(ops):
        def f(tok, w1, b1, w2, b2, *rest):
            shared = None if mode == "l1" else (rest[0], rest[1])
            out = rest if mode == "l1" else rest[2:]
            pairs = [(out[2 * i], out[2 * i + 1]) for i in range(n_out)]
            return fused_pair_loss(tok, p_i, p_j, target, w1, b1, w2, b2, pairs, mode, ops=ops, shared=shared)
        return f

    assert torch.autograd.gradcheck(loss_of(TorchPairOps), leaves, eps=1e-6, atol=1e-6, rtol=1e-5)
    loss_t = loss_of(TorchPairOps)(*leaves)
    grads_t = torch.autograd.grad(loss_t, leaves)
    leaves = [t.detach().to(device).requires_grad_() for t in leaves]
    p_i, p_j, target = p_i.to(device), p_j.to(device), target.to(device)
    kernels = _kernels(device)
    loss_k = loss_of(kernels)(*leaves)
    assert loss_k.dtype == torch.float64
    grads_k = torch.autograd.grad(loss_k, leaves)
    _assert_close(loss_k, loss_t, torch.float64, "loss")
    for g, g_t, name in zip(grads_k, grads_t, names):
        _assert_close(g.cpu(), g_t, torch.float64, f"d loss / d {name}")


# --------------------------------------------------------------------------------------- single kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch,n_tok,m,h", [(3, 9, 5, 7), (1, 1, 1, 1), (5, 16, 33, 130)])
def test_each_kernel_matches_its_torch_twin(device, dtype, batch, n_tok, m, h):
    g = torch.Generator().manual_seed(batch * 100 + h)
    kernels = _kernels(device)
    p_i = torch.randint(0, n_tok, (batch, m), generator=g).to(device)
    p_j = torch.randint(0, n_tok, (batch, m), generator=g).to(device)
    proj = torch.randn(batch * n_tok, 2 * h, generator=g).to(device, dtype)
    b1 = torch.randn(h, generator=g).to(device, dtype)
    h1 = kernels.gather_add_bias_relu(proj, p_i, p_j, b1, n_tok)
    h1_ref = TorchPairOps.gather_add_bias_relu(proj, p_i, p_j, b1, n_tok)
    assert h1.dtype == dtype
    assert torch.equal(h1, h1_ref), "gather_add_bias_relu: same adds in the same order, rounded once"
    # the fused head's case: P in the accumulation dtype, h1 rounded (to nearest even) to the compute dtype
    h1_low = kernels.gather_add_bias_relu(proj.float(), p_i, p_j, b1, n_tok, out_dtype=dtype)
    assert torch.equal(h1_low, TorchPairOps.gather_add_bias_relu(proj.float(), p_i, p_j, b1, n_tok, dtype))
    # repeated positions (m > N) exercise colliding atomic adds
    dh1 = torch.randn(batch * m, h, generator=g).to(device, dtype)
    dp = kernels.scatter_pairs(dh1, h1_ref, p_i, p_j, batch, n_tok)
    dp_ref = TorchPairOps.scatter_pairs(dh1, h1_ref, p_i, p_j, batch, n_tok)
    assert dp.dtype == dp_ref.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_close(dp, dp_ref, torch.float64 if dtype == torch.float64 else torch.float32, "scatter_pairs")
    for mode, n in (("l1", 1), ("ce", 5), ("cbr", 5), ("cbr", 1)):
        y = (3 * torch.randn(batch * m, 2 * n, generator=g)).to(device, dtype)
        t = torch.randint(0, n, (batch * m, 2), generator=g).to(device)
        if mode == "l1":
            t = torch.randint(0, 4, (batch * m, 2), generator=g).to(device, torch.float32)
        loss, grad = kernels.pair_loss(y, t, mode)
        loss_ref, grad_ref = TorchPairOps.pair_loss(y, t, mode)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        _assert_close(loss, loss_ref, acc, f"{mode} loss")
        _assert_close(grad, grad_ref, acc, f"{mode} grad")


# ------------------------------------------------------------------------------------------- dispatcher
def test_resolve_backend():
    assert dispatch.resolve_backend("auto", "cpu") == "torch"
    assert dispatch.resolve_backend("auto", "cuda") == "triton"
    assert dispatch.resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="engine.kernels"):
        dispatch.resolve_backend("cuda", "cpu")


def test_auto_on_cuda_falls_back_to_torch_when_triton_is_missing(monkeypatch, caplog):
    """engine.kernels=auto on a CUDA device without the triton package runs the PyTorch reference and says so
    once; an explicit engine.kernels=triton says how to fix it instead of sending the user back to 'auto'."""
    from kernels import triton_runtime

    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    monkeypatch.setattr(triton_runtime, "triton_available", lambda: False)
    dispatch._warn_no_triton.cache_clear()
    with caplog.at_level("WARNING", logger="smallvit"):
        assert dispatch.resolve_backend("auto", "cuda") == "torch"
        assert dispatch.resolve_backend("auto", "cuda:0") == "torch"
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "triton package is not installed" in caplog.records[0].getMessage()
    assert dispatch.resolve_backend("triton", "cuda") == "triton"
    with pytest.raises(TritonUnavailableError, match="engine.kernels=triton.*install triton.*engine.kernels=torch"):
        load_kernels("kernels.drloc_triton", torch.device("cuda"), "drloc_pair_loss")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.resolve_backend("auto", "cuda") == "triton"


# (B, k, m, C, H): odd sizes, a single pair, a 1x1 grid
FP64_SHAPES = [(3, 3, 5, 7, 9), (2, 1, 1, 3, 5), (5, 4, 7, 5, 11)]


@pytest.mark.parametrize("mode,use_abs", [("l1", True), ("ce", False), ("cbr", True), ("cbr", False)])
@pytest.mark.parametrize("shape", FP64_SHAPES)
def test_triton_fp64_equals_the_fp64_reference(device, shape, mode, use_abs):
    """The plain PyTorch reference computes float64 inputs in float64 (it used to cast its losses to float32), so
    the Triton kernels' fp64 accumulation is compared with a true fp64 reference: loss and every gradient to 1e-10."""
    problem = _problem(*shape, mode, use_abs, torch.float64, device, seed=sum(shape))
    loss_ref, grads_ref = _loss_and_grads("torch", *problem, mode)
    assert loss_ref.dtype == torch.float64
    loss, grads = _loss_and_grads("triton", *problem, mode)
    assert loss.dtype == torch.float64
    _assert_close(loss, loss_ref, torch.float64, "loss")
    for g, g_ref, name in zip(grads, grads_ref, _names(problem[1]), strict=True):
        _assert_close(g, g_ref, torch.float64, f"d loss / d {name}")


def test_fp64_reference_passes_gradcheck():
    tokens, params, p_i, p_j, target = _problem(2, 3, 4, 3, 5, "cbr", True, torch.float64, "cpu", seed=7)

    def loss(tok, *weights):
        w1, b1, w2, b2, w3, b3, wr, br, wc, bc = weights
        head = dispatch.HeadParams(w1, b1, w2, b2, ((wr, br), (wc, bc)), w3, b3)
        return dispatch.drloc_pair_loss(tok, p_i, p_j, target, head, "cbr", "torch")
    assert torch.autograd.gradcheck(loss, _leaves(tokens, params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_triton_on_cpu_without_interpreter_says_how():
    triton = pytest.importorskip("triton")
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False
        with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET=1"):
            dispatch.drloc_pairs_and_targets(2, 3, 4, True, 0, "cpu", "triton")


def test_interpreter_works_whatever_was_imported_first(interpret):
    """The kernel module imported plainly with the interpreter off (as an engine import would do) does not stop
    the dispatcher from running the interpreter afterwards."""
    triton = pytest.importorskip("triton")
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False
        import kernels.drloc_triton  # noqa: F401  (compiled-mode JITFunctions, unusable on CPU tensors)
    got = dispatch.drloc_pairs_and_targets(3, 4, 5, True, 9, "cpu", "triton")
    assert torch.equal(got[0], ref.counter_pair_positions(3, 4, 5, 9)[0])


@pytest.mark.parametrize("mode", ["l1", "ce", "cbr"])
def test_head_params_from_drloc_head(interpret, mode):
    """HeadParams.from_module reads engine.tasks.drloc.DrlocHead; both backends equal the head's own forward."""
    from engine.tasks.drloc import DrlocHead
    torch.manual_seed(0)
    k, c = 3, 5
    head = DrlocHead(c, k, mode=mode, use_abs=True, hidden=8)
    tokens = torch.randn(2, k * k, c)
    p_i, p_j, target = dispatch.drloc_pairs_and_targets(2, k, 6, True, 1, "cpu", "torch", mode == "l1")
    pred = head(ref.gather_pairs(tokens, p_i, p_j))
    want = {"l1": lambda: ref.l1_loss(pred[0], target), "ce": lambda: ref.ce_loss(pred[0], pred[1], target),
            "cbr": lambda: ref.cbr_loss(pred[0], pred[1], target)}[mode]()
    params = dispatch.HeadParams.from_module(head)
    for backend in ("torch", "triton"):
        got = dispatch.drloc_pair_loss(tokens, p_i, p_j, target, params, mode, backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert all(p.grad is not None for p in head.parameters())


# (B, k, m, C, H): odd sizes throughout, a single pair, a 1x1 grid
HEAD_MODULE_SHAPES = [(3, 3, 7, 5, 9), (2, 5, 1, 3, 13), (5, 1, 4, 7, 6)]


@pytest.mark.parametrize("mode,use_abs", [("ce", True), ("ce", False), ("cbr", True), ("cbr", False), ("l1", True)])
@pytest.mark.parametrize("shape", HEAD_MODULE_SHAPES)
def test_fused_paths_equal_the_drloc_head_forward_and_backward(interpret, shape, mode, use_abs):
    """DrlocHead (autograd through C's layer stack, the third Linear `layers.4` included for ce/cbr) against the
    fused Function with the torch twins and with the Triton kernels (interpreter): loss and every gradient."""
    from engine.tasks.drloc import DrlocHead
    batch, k, m, c, h = shape
    torch.manual_seed(sum(shape))
    head = DrlocHead(c, k, mode=mode, use_abs=use_abs, hidden=h)
    tokens = torch.randn(batch, k * k + 1, c)[:, 1:].requires_grad_()      # a CLS-dropping strided view
    p_i, p_j, target = ref.counter_pairs_and_targets(batch, k, m, use_abs, sum(shape), "cpu", mode == "l1")
    pred = head(ref.gather_pairs(tokens, p_i, p_j))
    want = {"l1": lambda: ref.l1_loss(pred[0], target), "ce": lambda: ref.ce_loss(pred[0], pred[1], target),
            "cbr": lambda: ref.cbr_loss(pred[0], pred[1], target)}[mode]()
    leaves = [tokens, *head.parameters()]
    names = ["tokens"] + [name for name, _ in head.named_parameters()]
    if mode != "l1":
        assert "layers.4.weight" in names and head.layers[4].weight.shape == (h, h)
    grads_want = torch.autograd.grad(want, leaves)
    params = dispatch.HeadParams.from_module(head)
    for backend in ("torch", "triton"):
        got = dispatch.drloc_pair_loss(tokens, p_i, p_j, target, params, mode, backend)
        _assert_close(got, want, torch.float32, f"{backend} loss")
        for g, g_want, name in zip(torch.autograd.grad(got, leaves), grads_want, names):
            _assert_close(g, g_want, torch.float32, f"{backend}: d loss / d {name}")


def test_autocast_bf16_gives_grads_in_param_dtype(interpret):
    tokens, params, p_i, p_j, target = _problem(3, 4, 6, 5, 8, "ce", True, torch.float32, "cpu", seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = _loss_and_grads("torch", tokens, params, p_i, p_j, target, "ce")
        loss, grads = _loss_and_grads("triton", tokens, params, p_i, p_j, target, "ce")
    assert loss.dtype == torch.float32
    _assert_close(loss, loss_ref, torch.bfloat16, "loss")
    for g, g_ref, name in zip(grads, grads_ref, _names(params)):
        assert g.dtype == torch.float32, name
        _assert_close(g, g_ref, torch.bfloat16, name)


@pytest.mark.parametrize("bad,match", [
    (dict(mode="mse"), "tasks.drloc.mode"),
    (dict(p_i=torch.zeros(2, 4, dtype=torch.int32)), "int64"),
    (dict(target=torch.zeros(2, 3, 2)), r"\(B, m, 2\)"),
    (dict(tokens=torch.zeros(2, 9, 4)), "2\\*C"),
])
def test_drloc_pair_loss_rejects_bad_inputs(bad, match):
    tokens, params, p_i, p_j, target = _problem(2, 3, 4, 5, 6, "l1", True, torch.float32, "cpu")
    args = dict(tokens=tokens, p_i=p_i, p_j=p_j, target=target, params=params, mode="l1", backend="torch")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        dispatch.drloc_pair_loss(**args)


def test_ce_and_cbr_refuse_a_head_without_the_third_linear():
    """A two-Linear ce/cbr head (the pre-fix layout) cannot slip through either backend; l1 takes none."""
    tokens, params, p_i, p_j, target = _problem(2, 3, 4, 5, 6, "ce", True, torch.float32, "cpu")
    short = dispatch.HeadParams(params.w1, params.b1, params.w2, params.b2, params.out)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="third Linear"):
            dispatch.drloc_pair_loss(tokens, p_i, p_j, target, short, "ce", backend)
    l1 = _problem(2, 3, 4, 5, 6, "l1", True, torch.float32, "cpu")
    extra = dispatch.HeadParams(l1[1].w1, l1[1].b1, l1[1].w2, l1[1].b2, l1[1].out, params.w3, params.b3)
    with pytest.raises(ValueError, match="third Linear"):
        dispatch.drloc_pair_loss(l1[0], *l1[2:], extra, "l1", "torch")


def test_deterministic_mode_uses_the_torch_scatter(interpret, monkeypatch):
    """Under torch.use_deterministic_algorithms the backward avoids the atomic-add kernel, same gradients."""
    problem = _problem(3, 3, 5, 4, 6, "ce", True, torch.float32, "cpu", seed=3)
    kernels = _kernels("cpu")

    def refuse(*args, **kwargs):
        raise AssertionError("atomic scatter used in deterministic mode")
    previous = torch.are_deterministic_algorithms_enabled()   # a run with engine.deterministic may have set it
    try:
        torch.use_deterministic_algorithms(False)
        loss, grads = _loss_and_grads("triton", *problem, "ce")
        monkeypatch.setattr(kernels, "scatter_pairs", refuse)
        torch.use_deterministic_algorithms(True)
        _, grads_det = _loss_and_grads("triton", *problem, "ce")
        for g, g_det, name in zip(grads, grads_det, _names(problem[1])):
            _assert_close(g_det, g, torch.float32, name)
        torch.use_deterministic_algorithms(False)
        with pytest.raises(AssertionError, match="atomic scatter"):
            _loss_and_grads("triton", *problem, "ce")
    finally:
        torch.use_deterministic_algorithms(previous)
