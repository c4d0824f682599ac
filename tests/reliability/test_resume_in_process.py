"""Resume exactness and non-finite steps, run in this process (no process start: cheap enough for many runs).

A 2-epoch ZeRO-1 reference run and one stopped mid-epoch (run.max_steps) then resumed are shared by items 2 and 12;
the trace (tests/reliability/traced_train.py) records each step's sample indices and augmented-image digest.
"""
import copy
import math
import os
import random

import pytest
import torch

import runs
from faults import InfGradient, inject_nonfinite
from runs import STEPS_PER_EPOCH, TRAIN_IMAGES

SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
rng = random.Random(SEED)
STOP = rng.randint(2, STEPS_PER_EPOCH - 2)      # the mid-epoch stop of the interrupted run
END = 2 * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def pair(tiny_betons, tmp_path_factory):
    """(uninterrupted, interrupted-and-resumed) run folders, both ZeRO 1, 2 epochs."""
    root = tmp_path_factory.mktemp("pair")
    ref, part = root / "ref", root / "part"
    runs.train_in_process(tiny_betons, ref, f"run.max_steps={END}", "engine.zero_stage=1")
    runs.train_in_process(tiny_betons, part, f"run.max_steps={STOP}", "engine.zero_stage=1")
    assert runs.latest(part).name == f"step_{STOP:08d}"
    runs.train_in_process(tiny_betons, part, f"run.max_steps={END}", "engine.zero_stage=1", "run.resume=auto")
    return ref, part


def test_item02_mid_epoch_resume_same_samples_and_augmentations(pair):
    """Item 2: after a mid-epoch stop and resume, the sample indices, labels and augmented images (so every sampled
    augmentation parameter) of each step for the rest of the epoch and the next equal the uninterrupted run's;
    each index appears exactly once in the interrupted epoch."""
    ref, part = pair
    a, b = runs.trace(ref), runs.trace(part)
    why = f"(RELIABILITY_SEED={SEED}, stopped after step {STOP})"
    assert sorted(b) == sorted(a) == list(range(1, END + 1)), why
    for step in range(STOP + 1, END + 1):
        for key in ("index", "labels", "images"):
            assert b[step][key] == a[step][key], f"step {step} {key} {why}"
    interrupted_epoch = [i for step in range(1, STEPS_PER_EPOCH + 1) for i in b[step]["index"]]
    assert sorted(interrupted_epoch) == list(range(TRAIN_IMAGES)), why   # 96 = 12 x 8: drop_last drops nothing


def test_item12_lr_and_optimizer_state_after_resume(pair):
    """Item 12 (supervised loop): the learning rate logged at every step after the resume, and the whole DeepSpeed
    state at the end (module, ZeRO-1 fp32 partitions, AdamW moments and step counts, the loss scaler and its
    overflow flag, DeepSpeed's step counters) equal the uninterrupted run's bitwise. (The EMA-teacher part of
    the item belongs to engine/pretrain.py and is tested with it.)"""
    ref, part = pair
    lr_ref = {r["step"]: r["lr"] for r in runs.records(ref)}
    lr_part = {r["step"]: r["lr"] for r in runs.records(part)}
    assert sorted(lr_part) == sorted(lr_ref) == list(range(1, END + 1))
    assert [lr_part[s] for s in lr_ref] == [lr_ref[s] for s in lr_ref]
    assert len(set(lr_ref.values())) > END // 2            # warm-up and cosine: the LR really moves every step
    final_ref, final_part = runs.latest(ref), runs.latest(part)
    assert final_ref.name == final_part.name == f"step_{END:08d}"
    files = sorted(p.name for p in (final_ref / "ds").iterdir())
    assert any("optim_states" in f for f in files), files
    assert sorted(p.name for p in (final_part / "ds").iterdir()) == files
    for name in files:
        # DeepSpeed's own files hold config objects: trusted here (we wrote them) but not weights_only-safe
        a = torch.load(final_ref / "ds" / name, map_location="cpu", weights_only=False)
        b = torch.load(final_part / "ds" / name, map_location="cpu", weights_only=False)
        diff = runs.differences(a, b)
        assert not diff, f"{name}: {diff[:5]}"
        if "optim_states" in name:
            state = a["optimizer_state_dict"]
            assert "loss_scaler" in state and "overflow" in state
    assert not runs.differences(torch.load(final_ref / "trainer_state.pt", weights_only=True),
                                torch.load(final_part / "trainer_state.pt", weights_only=True))


def _clone(x):
    """A detached deep copy of a nested state (ZeRO's state dict holds views, which deepcopy refuses)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):   # without "lr": the schedule sets it before every step, skipped or not
        return {k: _clone(v) for k, v in x.items() if k != "lr"}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x) if not hasattr(x, "_fields") else x
    return copy.deepcopy(x)


def _inject(monkeypatch, nan_step=None, inf_step=None):
    """Make the class loss NaN at global step `nan_step` and its gradient Inf at `inf_step` (1-based, as logged);
    record the engine and snapshot parameters + optimizer state at the start of every step."""
    import deepspeed

    monkeypatch.undo()   # a second injection replaces the first instead of wrapping it
    seen = {"engine": None, "snapshots": {}}
    real_init = deepspeed.initialize

    def initialize(*args, **kwargs):
        out = real_init(*args, **kwargs)
        seen["engine"] = out[0]
        return out

    def snapshot(step):
        eng = seen["engine"]
        seen["snapshots"][step] = ({n: p.detach().clone() for n, p in eng.module.named_parameters()},
                                   _clone(eng.optimizer.state_dict()))

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    inject_nonfinite(monkeypatch, nan_step, inf_step, at_step=snapshot)
    return seen


def _stops_at_the_bad_step(tiny_betons, tmp_path, monkeypatch, s, stage):
    """The default engine.fail_on_nonfinite: NaN loss at s stops there; an Inf gradient alone stops at s + 5."""
    from engine.loop import NonFiniteLoss

    _inject(monkeypatch, nan_step=s, inf_step=s + 5)
    with pytest.raises(NonFiniteLoss, match=f"non-finite loss nan at step {s} "):
        runs.train_in_process(tiny_betons, tmp_path / "stop", stage, "run.max_steps=10", record=False)
    assert [(r["step"], r["what"], r["action"]) for r in runs.records(tmp_path / "stop", "nonfinite")] == \
        [(s, "loss", "stopped")]
    assert not (tmp_path / "stop" / "checkpoints").exists()

    _inject(monkeypatch, inf_step=s + 5)
    with pytest.raises(NonFiniteLoss, match=f"non-finite gradient nan/inf at step {s + 5} "):
        runs.train_in_process(tiny_betons, tmp_path / "stop_grad", stage, "run.max_steps=10", record=False)
    assert max(runs.losses(tmp_path / "stop_grad")) == s + 4    # the steps before it ran and were logged


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_item13_nonfinite_loss_and_gradient_stop_or_skip(tiny_betons, tmp_path, monkeypatch, zero_stage):
    """Item 13 (fp32; ZeRO 0 and 1, whose skip paths differ): a NaN loss at step s and an Inf gradient (finite
    loss) at step s+5. By default the run stops at step s naming it (exception and metrics.jsonl), saving
    nothing for it; with only the Inf gradient it stops at s+5 the same way. With engine.fail_on_nonfinite=false
    both steps are skipped, logged and counted, and each skipped step leaves the parameters and the optimizer
    state exactly as they were before it. Stopping happens before anything reaches the optimizer, so it is
    tested on ZeRO 0 only."""
    s = 3
    stage = f"engine.zero_stage={zero_stage}"
    if zero_stage == 0:   # stopping does not depend on the stage (nothing reaches the optimizer): test it once
        _stops_at_the_bad_step(tiny_betons, tmp_path, monkeypatch, s, stage)
    seen = _inject(monkeypatch, nan_step=s, inf_step=s + 5)
    summary = runs.train_in_process(tiny_betons, tmp_path / "skip", stage, "run.max_steps=10",
                                    "engine.fail_on_nonfinite=false", record=False)
    assert summary["nonfinite_skipped"] == 2 and summary["global_step"] == 10
    out = tmp_path / "skip"
    assert [(r["step"], r["what"], r["action"]) for r in runs.records(out, "nonfinite")] == \
        [(s, "loss", "skipped"), (s + 5, "gradient", "skipped")]
    assert runs.records(out)[-1]["nonfinite_skipped"] == 2
    snaps = seen["snapshots"]
    for bad in (s, s + 5):
        (p0, o0), (p1, o1) = snaps[bad], snaps[bad + 1]
        assert not runs.differences(p0, p1), f"parameters changed by skipped step {bad}"
        if zero_stage:   # ZeRO's "overflow" is the status of its last step (reset by every step), not state
            assert (o0.pop("overflow"), o1.pop("overflow")) == (False, bad == s + 5)   # DeepSpeed saw it too
        assert not runs.differences(o0, o1), f"optimizer state changed by skipped step {bad}"
    (p0, _), (p1, _) = snaps[s + 1], snaps[s + 2]
    assert runs.differences(p0, p1), "a normal step must change the parameters"
    assert all(math.isfinite(v) for v in runs.losses(out).values() if v == v) and \
        all(torch.isfinite(p).all() for p in runs.weights(runs.latest(out)).values())


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_item13_bf16_inf_gradient_detected_and_skipped(zero_stage):
    """Item 13 (bf16): under DeepSpeed's real bf16 (bf16 weights, its bf16 optimizers, which run on the CPU
    accelerator; train() itself keeps fp32 on the CPU) an Inf gradient with a finite loss is caught before the
    optimizer step, and discarding it leaves parameters and optimizer state unchanged, while a normal step
    changes them. (The whole loop under bf16 needs CUDA: engine.precision=bf16 falls back to fp32 on the CPU.)"""
    import deepspeed

    from engine.grad_check import GradientCheck, discard_gradients
    from engine.models import create_model
    from engine.runtime import init_runtime
    from engine.train import param_groups
    from engine.train_module import TrainModule
    from loaders.batch import Batch

    init_runtime("cpu")
    torch.manual_seed(0)
    model = create_model("vit_cifar", num_classes=4, drop_path=0.0, depth=2, embed_dim=32, num_heads=2)
    module = TrainModule(model, torch.nn.ModuleList(), 0.0)
    optimizer = torch.optim.AdamW(param_groups(module, 0.05), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config={
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
        "zero_optimization": {"stage": zero_stage}, "steps_per_print": 10**9})
    if hasattr(engine.optimizer, "averaged_gradients"):
        engine.optimizer.check_grad_overflow = True        # as train() sets it
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    check = GradientCheck(engine.module)
    batch = Batch(images=torch.randn(4, 3, 32, 32).bfloat16(), labels=torch.arange(4), index=torch.arange(4))

    def snapshot():
        return ({n: p.detach().clone() for n, p in engine.module.named_parameters()},
                _clone(engine.optimizer.state_dict()))

    for step, poisoned in enumerate([False, True, False]):
        before = snapshot()
        loss, _ = engine(batch, 0.0, step)
        assert math.isfinite(loss.item())
        engine.backward(InfGradient.apply(loss) if poisoned else loss)
        finite = check.finite()
        assert finite == (not poisoned), step
        if finite:
            engine.step()
            assert runs.differences(before[0], snapshot()[0]), "a normal bf16 step must change the parameters"
        else:
            discard_gradients(engine)
            after = snapshot()
            for state in (before[1], after[1]):
                state.pop("overflow", None)   # the status flag of the last step, not optimizer state
            changed = runs.differences(before, after)
            assert not changed, f"the skipped bf16 step changed {changed[:3]}"
    check.remove()
