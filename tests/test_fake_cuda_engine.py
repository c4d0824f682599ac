"""The training and pretraining step code on fake CUDA tensors (FakeTensorMode: no GPU needed), so that a first run
on a GPU does not meet what the CPU cannot show: a CPU tensor meeting a CUDA one ("Expected all tensors to be on the
same device"), a host sync inside a step, a dtype mismatch under bf16 autocast.

How: modules are built on the CPU (their real initialisation) and moved with `.to("cuda")` inside the mode, which
swaps in fake CUDA parameters; every input is made on device 'cuda' inside the mode, and FakeTensorMode applies
CUDA's device rules (a 0-dim host tensor is a scalar argument, anything larger on the host raises). torch.autocast
turns itself off when CUDA is unavailable, so the fixture tells it CUDA and bf16 are there, and every bf16 test checks
that autocast really ran (the model's Linear outputs are bf16). Host syncs are refused by the guard of
tests/test_transforms_sync_free.py (item, bool, nonzero, boolean masks, host data, copies between devices), which
here lets one thing through: a Python scalar written into a slice (timm's Swin mask, `img_mask[:, a:b] = cnt`), a
fill_ whose value is read on the host without waiting for the device.

What fake tensors cannot run, and what stands in for it:
  - backward: the autograd engine asks the CUDA driver for a context (pytorch/pytorch#92627). The same forward and
    backward run on the 'meta' device instead (devices must agree there too), and the static step's backward is
    replaced by one that writes a gradient of each parameter's shape and device;
  - aten::_fused_adamw_ (the fused CUDA AdamW train() uses on CUDA) has no fake kernel: a stand-in checks what the
    CUDA kernel checks (lr and found_inf on the parameters' device, read as float32 like the step counts;
    parameters, gradients and moments alike in device and dtype);
  - CUDA graph capture and side streams (the static step's capture body runs eagerly here), the Triton drloc kernels
    (engine.kernels=torch), values: an evaluation's final reads (.item) return a constant once its batches are done.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from engine.config import config_from_dict
from engine.graphed_step import StaticStepRunner
from engine.models import create_model
from engine.pretrain import DINONetwork
from engine.ssl.updates import clip_per_parameter, ema_update
from engine.runtime import Runtime
from engine.ssl.backbone import MultiCropBackbone, pooled_features
from engine.ssl.head import DINOHead
from engine.ssl.knn import extract_features, knn_accuracy
from engine.ssl.loss import DINOLoss, collapse_stats
from engine.tasks import build_tasks
from engine.train import evaluate, param_groups
from engine.train_module import TrainModule
from loaders.batch import Batch
from test_transforms_sync_free import _SYNC_METHODS, HostSyncError, HostSyncGuard

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)


# ------------------------------------------------------------------------------------------ fake CUDA, the guard
@pytest.fixture
def fake_cuda(monkeypatch):
    """A FakeTensorMode (not entered: modules are built outside it) that makes fake CUDA tensors, with
    torch.autocast('cuda', bf16) enabled as on a GPU. Skips where this torch cannot make fake CUDA tensors."""
    import torch.cuda.amp.common as amp_common
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(amp_common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        try:
            probe = torch.empty(1, device="cuda")
        except Exception as e:                  # noqa: BLE001 - a torch build without CUDA support at all
            pytest.skip(f"FakeTensorMode cannot make fake CUDA tensors in this torch build: {e}")
    assert probe.device == CUDA
    return mode


class StepSyncGuard(HostSyncGuard):
    """HostSyncGuard, except a 0-dim host scalar through lift_fresh: `t[a:b] = 3` wraps 3 as a CPU scalar that fill_
    reads on the host, no device sync. An upload of host data is still refused (a copy between devices), and
    torch.tensor itself is patched out by no_step_sync."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if func.overloadpacket is aten.lift_fresh and args[0].dim() == 0 and args[0].device.type == "cpu":
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types_, args, kwargs)


@contextlib.contextmanager
def no_step_sync():
    """test_transforms_sync_free.no_host_sync with StepSyncGuard (and its own monkeypatch, so that a loader's
    generator can hold it while the caller's loop body runs)."""
    def forbidden(name):
        def raise_(*args, **kwargs):
            raise HostSyncError(f"host sync: {name}")
        return raise_

    with pytest.MonkeyPatch.context() as m:
        for name in _SYNC_METHODS:
            m.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
        for name in ("nonzero", "from_numpy", "tensor", "unique"):
            m.setattr(torch, name, forbidden(f"torch.{name}"))
        with StepSyncGuard():
            yield


@contextlib.contextmanager
def linear_output_dtypes(module: nn.Module):
    """The dtype of every nn.Linear output inside `module` during the block: bf16 where autocast ran."""
    seen: list[torch.dtype] = []
    handles = [m.register_forward_hook(lambda _m, _inputs, out: seen.append(out.dtype))
               for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def precision(name: str):
    """'bf16' (and 'deepspeed_bf16'): torch.autocast('cuda', bfloat16), as train() and pretrain() wrap their
    forward; 'fp32': nothing."""
    return contextlib.nullcontext() if name == "fp32" else torch.autocast("cuda", dtype=torch.bfloat16)


def compute_dtype(name: str) -> torch.dtype:
    return torch.float32 if name == "fp32" else torch.bfloat16


def test_fake_cuda_refuses_what_a_gpu_refuses(fake_cuda):
    """The audit is not vacuous: on fake CUDA a host tensor meeting a device one raises, a 0-dim host tensor passes
    (as on a GPU), autocast runs, and the guard refuses each kind of host sync but not a scalar slice fill."""
    with fake_cuda:
        on_gpu, on_host = torch.zeros(3, device="cuda"), torch.zeros(3)
        with pytest.raises(RuntimeError, match="device"):
            on_gpu + on_host
        assert (on_gpu * torch.ones(())).device == CUDA
        with precision("bf16"):
            assert nn.functional.linear(on_gpu, torch.ones(2, 3, device="cuda")).dtype == torch.bfloat16
        for attempt in (lambda: bool(on_gpu.sum()), lambda: on_gpu.sum().item(), lambda: on_gpu.cpu(),
                        lambda: on_host.to("cuda"), lambda: torch.tensor([1.0], device="cuda"),
                        lambda: on_gpu[on_gpu > 0]):
            with pytest.raises(HostSyncError), no_step_sync():
                attempt()
        with no_step_sync():
            on_gpu[1:] = 2.0


# ------------------------------------------------------------------------------------- the supervised step
# name -> (registered model, size overrides, task overrides): drloc's three losses, both target forms
CASES = {
    "vit": ("vit_cifar", dict(depth=1, embed_dim=32, num_heads=2), []),
    "vit_spt_lsa": ("vit_cifar", dict(depth=2, embed_dim=32, num_heads=2, spt=True, lsa=True),
                    ["tasks.drloc.mode=cbr", "tasks.drloc.use_abs=false"]),
    "swin_spt_lsa": ("swin_cifar", dict(depths=(2, 2), num_heads=(2, 4), embed_dim=16, spt=True, lsa=True),
                     ["tasks.drloc.mode=ce"]),
    "cait_lsa": ("cait_cifar", dict(depth=1, embed_dim=32, num_heads=2, lsa=True), []),
}


def train_module(case: str) -> TrainModule:
    """engine.train_module's TrainModule for a small model of `case`, drloc (PyTorch kernels) and translation+scale
    perceptibility on, on the CPU."""
    name, sizes, task_overrides = CASES[case]
    cfg = config_from_dict({}, ["optim.epochs=10", "engine.kernels=torch", "tasks.drloc.enabled=true",
                                "tasks.drloc.hidden=16", "tasks.drloc.pairs=8", "tasks.perceptibility.enabled=true",
                                "tasks.perceptibility.hidden=16", "tasks.perceptibility.kind=both", *task_overrides])
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, drop_path=0.1, **sizes)
    return TrainModule(model, build_tasks(cfg, model.embed_dim, model.grid_size), label_smoothing=0.1)


def make_batch(device="cuda", n: int = 6, soft_labels: bool = False) -> Batch:
    """A training Batch as the CUDA loaders yield it (loaders/batch.py): channels_last images, the perceptibility
    view and its grid indices, soft labels when mixing ran."""
    def image():
        return torch.randn(n, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    params = {"translate": torch.rand(n, 2, device=device), "scale": torch.rand(n, 1, device=device),
              "translate_idx": torch.randint(0, 10, (n, 2), device=device),
              "scale_idx": torch.randint(0, 10, (n, 1), device=device)}
    soft = torch.softmax(torch.randn(n, 10, device=device), dim=1) if soft_labels else None
    return Batch(images=image(), labels=torch.randint(0, 10, (n,), device=device),
                 index=torch.arange(n, device=device), soft_labels=soft, params=params,
                 views={"transformed": image()})


@pytest.mark.parametrize("prec", ["fp32", "bf16", "deepspeed_bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_train_module_forward_on_fake_cuda(case, prec, fake_cuda):
    """TrainModule's forward (class CE + drloc on both passes + perceptibility) with a Python int seed (DeepSpeed's
    step) and a 0-dim int64 device seed (the static step's): every tensor on the device, no host sync, the loss and
    every logged part fp32 scalars, the model's Linears in the compute dtype. 'bf16': fp32 weights under autocast
    (the static step, torch AMP); 'deepspeed_bf16': DeepSpeed's bf16 path, which casts the module to bf16 and
    meets the loader's fp32 images under the loop's autocast."""
    module = train_module(case)
    if prec == "deepspeed_bf16":
        module = module.bfloat16()
    with fake_cuda:
        module = module.to("cuda")
        batch = make_batch(soft_labels=prec == "fp32")
        for seed in (12345, torch.full((), 12345, dtype=torch.int64, device="cuda")):
            with linear_output_dtypes(module.model) as dtypes, precision(prec), no_step_sync():
                loss, parts = module(batch, 5.0, seed)
            assert set(dtypes) == {compute_dtype(prec)}
            assert (loss.device, loss.dtype, loss.shape) == (CUDA, torch.float32, ())
            assert {"cls_loss", "drloc_loss", "drloc_pass1", "perceptibility_loss", "perceptibility_l1_scale",
                    "perceptibility_l1_translate", "perceptibility_ce_transformed"} <= set(parts)
            assert {(v.device, v.dtype, v.shape) for v in parts.values()} == {(CUDA, torch.float32, ())}, parts


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_module_backward_keeps_every_gradient_on_the_device(case):
    """Backward cannot run on fake CUDA (the autograd engine wants a CUDA context); on 'meta' tensors, which also
    refuse a host tensor meeting a device one, the same graph reaches every trainable parameter with a gradient on
    the parameters' device."""
    module = train_module(case).to("meta")
    loss, _ = module(make_batch("meta"), 5.0, torch.full((), 7, dtype=torch.int64, device="meta"))
    loss.backward()
    assert [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None] == []
    assert {p.grad.device.type for p in module.parameters() if p.requires_grad} == {"meta"}


# -------------------------------------------------------------------------------------------- the static step
def write_gradients(module: nn.Module):
    """Tensor.backward's stand-in on fake CUDA: a gradient of each trainable parameter's shape, dtype and device,
    accumulated into .grad as autograd does."""
    def backward(loss, *args, **kwargs):
        assert loss.shape == () and loss.device == CUDA and loss.requires_grad
        for p in module.parameters():
            if p.requires_grad:
                g = torch.full_like(p, 0.5)
                p.grad = g if p.grad is None else p.grad + g
    return backward


def fused_adamw_contract(calls: list):
    """torch._fused_adamw_'s stand-in (no fake kernel exists): what the CUDA kernel checks before it runs
    (ATen/native/cuda/FusedAdamWKernel.cu: lr and found_inf on the parameters' device; it reads lr, found_inf and
    the step counts through float pointers; params, grads and moments alike in device and dtype). Updates nothing."""
    def fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                     weight_decay, eps, amsgrad, maximize, grad_scale=None, found_inf=None):
        device = params[0].device
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            raise RuntimeError(f"lr must be on the same GPU device as the params (got {lr!r})")
        for name, t in (("lr", lr), ("found_inf", found_inf), ("grad_scale", grad_scale)):
            if t is not None and (t.device != device or t.dtype != torch.float32 or t.numel() != 1):
                raise RuntimeError(f"{name} must be one float32 on the same GPU device as the params, got "
                                   f"{t.dtype} {tuple(t.shape)} on {t.device}")
        for group in zip(params, grads, exp_avgs, exp_avg_sqs):
            if len({(t.device, t.dtype) for t in group}) != 1:
                raise RuntimeError("params, grads, exp_avgs, and exp_avg_sqs must have same dtype, device, and layout")
        if {(s.device, s.dtype) for s in state_steps} != {(device, torch.float32)}:
            raise RuntimeError(f"state_steps must be float32 on {device}")
        calls.append({"params": len(params), "found_inf": found_inf is not None})
    return fused_adamw_


# (runner mode, fused AdamW, precision): train() builds fused AdamW on CUDA; 'graphed' sets the optimizer up for
# capture (capturable, step counts on the device) and runs the body a capture records, eagerly
STATIC_CASES = [("emulated", True, "fp32"), ("emulated", True, "bf16"), ("emulated", False, "fp32"),
                ("graphed", True, "fp32"), ("graphed", True, "bf16"), ("graphed", False, "bf16")]


@pytest.mark.parametrize("mode,fused,prec", STATIC_CASES)
def test_static_step_on_fake_cuda(mode, fused, prec, fake_cuda, monkeypatch):
    """StaticStepRunner's step on fake CUDA as train() drives it (clip on, fail_on_nonfinite, LR / seed / task
    weights / step number filled into device scalars, the batch copied into static buffers): after the first step
    (which allocates AdamW's state and the accumulators, as the eager warm-up does before capture) a step makes no
    host sync, and the optimizer state, the accumulators and the counters all stay on the device."""
    module = train_module("vit")
    calls: list = []
    with fake_cuda:
        module = module.to("cuda")
        optimizer = torch.optim.AdamW(param_groups(module, 0.05), lr=1e-3, fused=fused or None,
                                      foreach=None if fused else True)   # unfused: foreach, a GPU's default
        runner = StaticStepRunner(module, optimizer, mode, CUDA, torch.bfloat16 if prec == "bf16" else None,
                                  fail_on_nonfinite=True, clip=1.0)
        runner.mode = "emulated"   # the step body without capture or side stream (real CUDA only)
        monkeypatch.setattr(torch.Tensor, "backward", write_gradients(module))
        monkeypatch.setattr(torch, "_fused_adamw_", fused_adamw_contract(calls))
        for step in range(3):
            batch = make_batch()
            with linear_output_dtypes(module.model) as dtypes, no_step_sync() if step else contextlib.nullcontext():
                runner.step(batch, 1e-3 * (step + 1), 1000 + step, 5.0 + step / 10, step)
            assert set(dtypes) == {compute_dtype(prec)}
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        assert len(optimizer.state) == len(runner.params) and {t.device for t in state} == {CUDA}
        assert {s["step"].dtype for s in optimizer.state.values()} == {torch.float32}
        window = runner.window
        buffers = [runner.lr, runner.seed, runner.step_number, window.sums, window.ok_steps, window.nonfinite,
                   window.first_bad, runner.halted, *runner.task_weights]
        assert {t.device for t in buffers} == {CUDA} and runner.lr.dtype == torch.float32
        assert window.names[:2] == ["loss", "cls_loss"] and window.sums.shape == (len(window.names),)
        assert all(p.device == CUDA for p in module.parameters())
    assert calls == ([{"params": len(g["params"]), "found_inf": True} for _ in range(3)
                      for g in optimizer.param_groups] if fused else [])


# --------------------------------------------------------------------------------------------- pretraining
# name -> (registered model, size overrides, ssl.pos_embed_resize): one pass per crop size, 32 px and 16 px
DINO_CASES = {
    "vit": ("vit_cifar", dict(depth=1, embed_dim=32, num_heads=2), "interpolate"),
    "cait_truncate": ("cait_cifar", dict(depth=1, embed_dim=32, num_heads=2), "truncate"),
    "swin_spt_lsa": ("swin_cifar", dict(depths=(2, 2), num_heads=(2, 4), embed_dim=16, spt=True, lsa=True),
                     "interpolate"),
}
OUT_DIM = 64


def dino_network(case: str, drop_path: float) -> DINONetwork:
    """engine.pretrain's network (backbone per crop size + DINO head) for a small model of `case`, on the CPU."""
    name, sizes, resize = DINO_CASES[case]
    model = create_model(name, num_classes=0, drop_path=drop_path, **sizes)
    head = DINOHead(MultiCropBackbone(model).embed_dim, OUT_DIM, hidden_dim=32, bottleneck_dim=16)
    return DINONetwork(model, head, resize)


@pytest.mark.parametrize("case", sorted(DINO_CASES))
def test_dino_forward_on_fake_cuda(case, fake_cuda):
    """pretrain()'s forward under bf16 autocast: the fp32 teacher on the 2 global crops (32 px) without grad, the
    student on them and 3 local crops (16 px: resized position embedding / Swin's per-input masks), the DINO loss
    and the collapse monitors: all on the device, no host sync, the loss fp32."""
    torch.manual_seed(0)
    student, teacher = dino_network(case, 0.1), dino_network(case, 0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = DINOLoss(OUT_DIM, 2, 0.1, 0.04, 0.07, 3, 0.9)
    with fake_cuda:
        student, teacher, loss_fn = student.to("cuda"), teacher.to("cuda"), loss_fn.to("cuda")
        crops = ([torch.randn(5, 3, 32, 32, device="cuda") for _ in range(2)]
                 + [torch.randn(5, 3, 16, 16, device="cuda") for _ in range(3)])
        with linear_output_dtypes(student) as dtypes, precision("bf16"), no_step_sync():
            with torch.no_grad():
                teacher_out = teacher(crops[:2])
            student_out = student(crops)
            loss = loss_fn(student_out, teacher_out, 1)
            stats = collapse_stats(loss_fn.teacher_probs(teacher_out, 1), loss_fn.center)
        assert set(dtypes) == {torch.bfloat16}
        assert student_out.shape == (25, OUT_DIM) and teacher_out.shape == (10, OUT_DIM)
        assert {student_out.device, teacher_out.device, loss.device} == {CUDA}
        assert loss.dtype == torch.float32 and loss.shape == () and loss.requires_grad
        assert {(v.device, v.shape) for v in stats.values()} == {(CUDA, ())}


def _head() -> DINOHead:
    torch.manual_seed(1)
    return DINOHead(32, OUT_DIM, hidden_dim=32, bottleneck_dim=16)


def _set_gradients(head: DINOHead, device) -> None:
    """Gradients with norms far above and far below DINO's clip of 3."""
    g = torch.Generator().manual_seed(3)
    for i, p in enumerate(head.parameters()):
        if p.requires_grad:    # last_layer.weight_g is frozen (norm_last_layer): no gradient
            p.grad = (torch.randn(p.shape, generator=g) * (0.01 if i % 2 else 10.0)).to(device)


def test_per_parameter_clipping_makes_no_host_sync_on_fake_cuda(fake_cuda):
    """DINO's per-parameter clipping runs after every backward of pretraining: `if coef < 1` read each
    parameter's norm on the host (one sync per parameter per step on a GPU)."""
    head = _head()
    with fake_cuda:
        head = head.to("cuda")
        for p in head.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, device="cuda")
        with no_step_sync():
            clip_per_parameter(head.parameters(), 3.0)
        assert {p.grad.device for p in head.parameters() if p.grad is not None} == {CUDA}


def test_per_parameter_clipping_equals_dinos_clip_gradients_on_the_cpu():
    """The device-side choice of the scale gives DINO's utils.clip_gradients bit for bit: norms above and below
    max_norm, a zero gradient, a parameter without gradient."""
    head, reference = _head(), _head()
    for module in (head, reference):
        _set_gradients(module, "cpu")
        next(module.parameters()).grad.zero_()
    clip_per_parameter(head.parameters(), 3.0)
    for p in reference.parameters():            # DINO's utils.clip_gradients
        if p.grad is not None:
            clip_coef = 3.0 / (p.grad.norm(2) + 1e-6)
            if clip_coef < 1:
                p.grad.mul_(clip_coef)
    pairs = [(a.grad, b.grad) for a, b in zip(head.parameters(), reference.parameters())]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in pairs)
    norms = [b.norm().item() for _, b in pairs if b is not None]
    assert min(norms) == 0.0 and max(norms) == pytest.approx(3.0, rel=1e-5)   # both sides of max_norm were hit


def test_centre_update_makes_no_host_sync_on_fake_cuda(fake_cuda):
    """The centre update after every applied pretraining step, on bf16 teacher logits: the batch size entered as
    torch.tensor(..., device=cuda), a host-to-device copy that waits for the device every step."""
    loss_fn = DINOLoss(OUT_DIM)
    with fake_cuda:
        loss_fn = loss_fn.to("cuda")
        logits = torch.randn(10, OUT_DIM, device="cuda", dtype=torch.bfloat16)
        with no_step_sync():
            loss_fn.update_center(logits)
        assert (loss_fn.center.device, loss_fn.center.dtype, loss_fn.center.shape) == (CUDA, torch.float32,
                                                                                       (1, OUT_DIM))


def test_centre_update_unchanged_on_the_cpu():
    """The centre after updates equals DINO's formula as it was written (division by a float32 count tensor)."""
    loss_fn = DINOLoss(OUT_DIM, center_momentum=0.9)
    center = torch.zeros(1, OUT_DIM)
    g = torch.Generator().manual_seed(2)
    for n in (10, 7, 1):
        logits = torch.randn(n, OUT_DIM, generator=g) * 3
        loss_fn.update_center(logits)
        center.mul_(0.9).add_(logits.float().sum(0, keepdim=True) / torch.tensor(float(n)), alpha=1 - 0.9)
    assert torch.equal(loss_fn.center, center)


def test_teacher_ema_makes_no_host_sync_on_fake_cuda(fake_cuda):
    """The teacher EMA after every applied step: parameter by parameter on the device."""
    torch.manual_seed(0)
    student, teacher = dino_network("vit", 0.1), dino_network("vit", 0.0)
    teacher.requires_grad_(False)
    with fake_cuda:
        student, teacher = student.to("cuda"), teacher.to("cuda")
        with no_step_sync():
            ema_update(teacher, student, 0.996)
        assert {(p.device, p.dtype) for p in teacher.parameters()} == {(CUDA, torch.float32)}


# ------------------------------------------------------------------------------------------------ evaluation
class GuardedLoader:
    """An evaluation loader on fake CUDA (`epoch(e)` yields Batches) whose batches are consumed under the sync
    guard: the guard holds while the caller's loop body runs between two batches, and ends once the loader is
    exhausted (where the caller may read its totals on the host)."""

    def __init__(self, sizes):
        self.sizes = sizes

    def epoch(self, epoch, start_step=0):
        batches = [Batch(images=torch.randn(n, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last),
                         labels=torch.randint(0, 10, (n,), device="cuda"), index=torch.arange(n, device="cuda"))
                   for n in self.sizes]
        with no_step_sync():
            yield from batches


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_evaluate_accumulates_on_the_device(prec, fake_cuda, monkeypatch):
    """train.evaluate: no host sync per batch (loss, top-1, top-5 and count summed in a float64 device buffer),
    the totals read once at the end."""
    torch.manual_seed(0)
    model = create_model("vit_cifar", num_classes=10, depth=1, embed_dim=32, num_heads=2)
    reads = []
    with fake_cuda:
        model = model.to("cuda")
        from torch._subclasses.fake_tensor import FakeTensor   # it defines its own tolist

        monkeypatch.setattr(FakeTensor, "tolist", lambda t: reads.append((t.device, t.dtype, t.shape)) or [3.0] * 4)
        with linear_output_dtypes(model) as dtypes:
            result = evaluate(model, GuardedLoader([7, 5, 3]), Runtime(0, 1, 0, CUDA), compute_dtype(prec))
    assert set(dtypes) == {compute_dtype(prec)} and model.training
    assert reads == [(CUDA, torch.float64, (4,))]   # one read of the four totals
    assert result == {"loss": 1.0, "top1": 100.0, "top5": 100.0, "count": 3}


def test_knn_probe_stays_on_the_device(fake_cuda, monkeypatch):
    """pretrain.knn_probe's parts: features of every batch (bf16 autocast, pooled, L2-normalised in fp32) without a
    host sync, then the weighted k-NN vote on the device, read once at the end."""
    torch.manual_seed(0)
    model = create_model("vit_cifar", num_classes=0, depth=1, embed_dim=32, num_heads=2)
    reads = []
    with fake_cuda:
        model = model.to("cuda")

        def features(x):
            with precision("bf16"):
                return pooled_features(model, x)

        bank, labels = extract_features(features, GuardedLoader([7, 5, 3]))
        assert (bank.shape, bank.dtype, bank.device, labels.device) == ((15, 32), torch.float32, CUDA, CUDA)
        monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t.device) or 0)
        assert knn_accuracy(bank, labels, bank[:11], labels[:11], 10, k=4, chunk=4) == 0.0
    assert reads == [CUDA]   # one read for the whole probe, not one per chunk of queries
