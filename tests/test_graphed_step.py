"""engine.graph_step: the static-buffer training step (engine/graphed_step.py) against DeepSpeed's step, on the CPU.

The capture itself needs CUDA; here the same step runs eagerly ('emulate'): static buffers filled in place, the LR,
task weights and drloc seed as device scalars, the non-finite check and skip on the device, loss and counters
summed in device buffers. Runs are the tiny set of tests/conftest.py (96 images, batch 8: 12 steps per epoch) with
a 1-block ViT of width 16, drop-path on, clipping on, drloc and translation perceptibility on, on the CPU even
where CUDA is present (bitwise comparisons). The last test captures the step on CUDA and skips without it.
"""
import logging

import pytest
import torch
from safetensors.torch import load_file

from engine.config import config_from_dict
from engine.graphed_step import StaticStepRunner, config_fallback_reason, plan_graph_step
from engine.run_log import read_metrics
from reliability.faults import inject_nonfinite

STEPS = 20


def _cfg(betons, out, *extra):
    return config_from_dict({}, [
        f"data.train={betons['train']}", f"data.test={betons['test']}", "data.dataset=tiny", "data.loader=resident",
        "data.batch_size=8", "data.eval_batch_size=48", "model.depth=1", "model.embed_dim=16", "model.num_heads=2",
        "model.drop_path=0.1", "optim.epochs=9", "optim.warmup_epochs=1", "optim.clip_grad=0.5",
        "engine.precision=fp32", "engine.device=cpu", "run.progress=false", "run.log_every=1", f"run.out_dir={out}",
        "run.keep_last=0", "tasks.drloc.enabled=true", "tasks.drloc.hidden=16", "tasks.drloc.pairs=8",
        "tasks.perceptibility.enabled=true", "tasks.perceptibility.hidden=16", *extra])


def _train(betons, out, *extra):
    from engine.train import train

    torch.set_num_threads(1)   # bitwise comparisons must not depend on how a matmul is split over threads
    return train(_cfg(betons, out, *extra))


def _records(out, kind="train"):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == kind]


def _losses(out):
    return {r["step"]: r["loss"] for r in _records(out)}


@pytest.fixture(scope="module")
def normal_run(tiny_betons, tmp_path_factory):
    """DeepSpeed's step, 20 steps (into epoch 1, where both task weights are non-zero), a checkpoint after step 9."""
    out = tmp_path_factory.mktemp("graphed") / "normal"
    _train(tiny_betons, out, f"run.max_steps={STEPS}", "run.checkpoint_every_steps=9")
    return out


@pytest.fixture(scope="module")
def emulated_run(tiny_betons, tmp_path_factory):
    """The static step, emulated, same 20 steps, a checkpoint after step 8."""
    out = tmp_path_factory.mktemp("graphed") / "emulated"
    _train(tiny_betons, out, f"run.max_steps={STEPS}", "run.checkpoint_every_steps=8", "engine.graph_step=emulate")
    return out


def test_emulated_step_gives_the_losses_of_deepspeeds_step(normal_run, emulated_run):
    """(1) 20 steps: every logged loss and part (class CE, drloc per pass, perceptibility CE and L1) equal,
    tolerance 0. Bitwise, not allclose, because the emulated step runs the same kernels on the same values: the
    float64 LR tensor gives AdamW the scalar math of DeepSpeed's Python-float LR, the gradient norm is summed in
    the module's parameter order as DeepSpeed's clip_grad_norm_ sums it, the task weights enter as fp32 scalars
    as the Python floats do, and the drloc seed tensor hashes to the same pairs as the int seed."""
    a, b = _records(normal_run), _records(emulated_run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    keys = [k for k in a[0] if k not in ("time", "kind")]
    assert {"cls_loss", "drloc_pass1", "perceptibility_ce_transformed", "perceptibility_l1_translate"} <= set(keys)
    for ra, rb in zip(a, b):
        assert rb["steps_averaged"] == 1
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, ra["step"]
    assert len({r["loss"] for r in a}) == STEPS       # the losses really move
    assert a[-1]["epoch"] == 1 and a[-1]["drloc_loss"] > 0   # past epoch 0, where lambda(e) of both tasks is 0


def test_resume_from_an_emulated_checkpoint_continues_to_the_same_losses(tiny_betons, tmp_path, normal_run,
                                                                          emulated_run):
    """(4) A checkpoint written on the emulated path (after step 8) resumes, emulated, to the uninterrupted
    losses of steps 9..20, bitwise, and DeepSpeed's own counters match the steps taken; DeepSpeed's step resumes
    from it to the same losses too."""
    ckpt = emulated_run / "checkpoints" / "step_00000008"
    out = tmp_path / "resumed"
    summary = _train(tiny_betons, out, f"run.max_steps={STEPS}", f"run.resume={ckpt}", "engine.graph_step=emulate")
    assert summary["global_step"] == STEPS
    resumed, whole = _losses(out), _losses(emulated_run)
    assert sorted(resumed) == list(range(9, STEPS + 1))
    assert resumed == {s: whole[s] for s in resumed} == {s: _losses(normal_run)[s] for s in resumed}
    state = torch.load(out / "checkpoints" / f"step_{STEPS:08d}" / "ds" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert state["global_steps"] == STEPS and state["global_samples"] == STEPS * 8
    # and DeepSpeed's own step takes the same checkpoint (its LR tensor in the saved param groups) to the same losses
    _train(tiny_betons, tmp_path / "resumed_off", f"run.max_steps={STEPS}", f"run.resume={ckpt}")
    assert _losses(tmp_path / "resumed_off") == resumed


def test_emulated_step_equals_deepspeeds_on_a_second_recipe_shape(tiny_betons, tmp_path):
    """The same bitwise equality on another shape and task mix: batch 12 (a partial last batch dropped), 2 blocks
    of width 24 with 3 heads, drloc 'ce' with relative offsets, translation+scale perceptibility, AutoAugment,
    Mixup/CutMix soft labels, erasing, label smoothing, weights per step."""
    shape = ("data.batch_size=12", "model.depth=2", "model.embed_dim=24", "model.num_heads=3",
             "tasks.drloc.mode=ce", "tasks.drloc.use_abs=false", "tasks.drloc.weight_per_step=true",
             "tasks.perceptibility.kind=both", "tasks.perceptibility.weight_per_step=true",
             "data.auto_augment=cifar10", "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", "data.erasing_prob=0.25",
             "optim.label_smoothing=0.1", "optim.warmup_epochs=0", "run.max_steps=10")
    _train(tiny_betons, tmp_path / "normal", *shape)
    _train(tiny_betons, tmp_path / "emulated", *shape, "engine.graph_step=emulate")
    a, b = _records(tmp_path / "normal"), _records(tmp_path / "emulated")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    keys = [k for k in a[0] if k not in ("time", "kind")]
    assert {"drloc_pass1", "perceptibility_l1_scale"} <= set(keys), keys
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, ra["step"]
    assert b[-1]["drloc_loss"] > 0 and len({r["loss"] for r in a}) == 10


def test_a_config_that_cannot_be_captured_falls_back_with_its_reason(tiny_betons, tmp_path, caplog):
    """(2) ZeRO stage 1 runs DeepSpeed's step and says why in one line; so do a last partial batch, 'on' without
    CUDA and more than one rank, decided before any work."""
    with caplog.at_level(logging.WARNING, logger="smallvit"):
        summary = _train(tiny_betons, tmp_path / "zero1", "run.max_steps=2", "engine.zero_stage=1",
                         "engine.graph_step=emulate")
    assert summary["global_step"] == 2 and "steps_averaged" not in _records(tmp_path / "zero1")[0]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("graphed step off:")]
    assert len(lines) == 1 and "engine.zero_stage=1" in lines[0] and "\n" not in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smallvit"):   # 96 images in batches of 20: a last batch of 16
        _train(tiny_betons, tmp_path / "partial", "run.max_steps=1", "data.drop_last=false", "data.batch_size=20",
               "engine.graph_step=emulate")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("graphed step off:")]
    assert len(lines) == 1 and "data.drop_last=false: the last batch of each epoch has 16 images" in lines[0]

    cpu = torch.device("cpu")

    def reason(*overrides, world_size=1, images=96):
        return config_fallback_reason(_cfg(tiny_betons, tmp_path, *overrides), world_size, cpu, images)

    assert "data.drop_last=false" in reason("data.drop_last=false", "data.batch_size=10", "engine.graph_step=emulate")
    assert reason("data.drop_last=false", "engine.graph_step=emulate") is None   # 96 = 12 x 8: no partial batch
    assert "captures a CUDA graph" in reason("engine.graph_step=on")
    assert "captures a CUDA graph" in reason("engine.graph_step=auto")
    assert "2 ranks" in reason("engine.graph_step=emulate", world_size=2)
    assert reason("engine.graph_step=emulate") is None
    plan = plan_graph_step(_cfg(tiny_betons, tmp_path, "engine.graph_step=on"), 1, cpu, 96)
    assert (plan.mode, plan.active) == ("off", False) and plan.reason
    assert plan_graph_step(_cfg(tiny_betons, tmp_path, "engine.graph_step=emulate"), 1, cpu, 96).mode == "emulated"
    assert plan_graph_step(_cfg(tiny_betons, tmp_path), 1, cpu, 96).mode == "off"   # the default


def test_graph_step_key_reads_on_and_off_from_yaml_and_refuses_other_values():
    """YAML 1.1 reads a bare on/off as a boolean: the key maps them back; anything else is refused by name."""
    from engine.config import ConfigError

    assert [config_from_dict({}, [f"engine.graph_step={v}"]).engine.graph_step
            for v in ("off", "on", "auto", "emulate")] == ["off", "on", "auto", "emulate"]
    assert config_from_dict({"engine": {"graph_step": False}}).engine.graph_step == "off"
    with pytest.raises(ConfigError, match="engine.graph_step"):
        config_from_dict({}, ["engine.graph_step=yes please"])
    with pytest.raises(ConfigError, match="engine.compile"):   # other boolean keys still take only booleans
        config_from_dict({}, ["engine.compile=auto"])


_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _count_host_syncs(monkeypatch) -> dict:
    """Count the Tensor methods that copy a value to the host, separately inside StaticStepRunner.step (minus
    the torch CPU AdamW's own step-count .item(), which the capturable CUDA optimizer does not make) and inside
    StaticStepRunner.read."""
    counts = {"step": 0, "read": 0, "where": None, "steps": 0, "reads": 0}
    for name in _SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if counts["where"]:
                counts[counts["where"]] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    real_step, real_read = StaticStepRunner.step, StaticStepRunner.read

    def step(self, *args, **kwargs):
        if not hasattr(self.optimizer, "_uncounted"):
            optimizer_step = self.optimizer.step

            def uncounted(*a, **k):
                where, counts["where"] = counts["where"], None
                try:
                    return optimizer_step(*a, **k)
                finally:
                    counts["where"] = where
            self.optimizer.step, self.optimizer._uncounted = uncounted, True
        counts["where"], counts["steps"] = "step", counts["steps"] + 1
        try:
            return real_step(self, *args, **kwargs)
        finally:
            counts["where"] = None

    def read(self):
        counts["where"], counts["reads"] = "read", counts["reads"] + 1
        try:
            return real_read(self)
        finally:
            counts["where"] = None
    monkeypatch.setattr(StaticStepRunner, "step", step)
    monkeypatch.setattr(StaticStepRunner, "read", read)
    return counts


def test_device_buffers_log_window_means_and_count_nonfinite_steps_without_host_syncs(
        tiny_betons, tmp_path, monkeypatch, normal_run):
    """(3) With run.log_every=5 the emulated path logs, every 5 steps, the mean loss of the finite steps of the
    window (equal to the mean of DeepSpeed's per-step losses, float64 sums of the same fp32 values); a NaN loss
    at step 10 is skipped on the device, counted and reported at the read (step 10, 'loss'), leaving the weights
    and AdamW state of step 9. No host sync inside any step; one per read."""
    inject_nonfinite(monkeypatch, nan_step=10)
    counts = _count_host_syncs(monkeypatch)
    out = tmp_path / "nan"
    summary = _train(tiny_betons, out, "run.max_steps=10", "run.log_every=5", "engine.fail_on_nonfinite=false",
                     "engine.graph_step=emulate")
    monkeypatch.undo()
    assert summary["nonfinite_skipped"] == 1 and summary["global_step"] == 10
    ref = _losses(normal_run)
    recs = _records(out)
    assert [(r["step"], r["steps_averaged"], r["nonfinite_skipped"]) for r in recs] == [(5, 5, 0), (10, 4, 1)]
    assert recs[0]["loss"] == pytest.approx(sum(ref[s] for s in range(1, 6)) / 5, rel=1e-12, abs=0)
    assert recs[1]["loss"] == pytest.approx(sum(ref[s] for s in range(6, 10)) / 4, rel=1e-12, abs=0)
    assert [(r["step"], r["what"], r["action"]) for r in _records(out, "nonfinite")] == [(10, "loss", "skipped")]
    assert counts["steps"] == 10 and counts["step"] == 0, counts
    assert counts["reads"] >= 2 and counts["read"] == counts["reads"], counts   # the counter sees a real sync
    # the skipped step changed nothing: weights and optimizer state equal DeepSpeed's path after step 9
    mine, ref_ckpt = out / "checkpoints" / "step_00000010", normal_run / "checkpoints" / "step_00000009"
    a, b = load_file(mine / "model.safetensors"), load_file(ref_ckpt / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt = [torch.load(f / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["optimizer"]
           for f in (mine, ref_ckpt)]
    sa, sb = opt[0]["state"], opt[1]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert all(float(sa[i]["step"]) == 9 for i in sa)


def test_nonfinite_gradient_stops_at_the_read_naming_its_step(tiny_betons, tmp_path, monkeypatch):
    """Under the default engine.fail_on_nonfinite an Inf gradient (finite loss) at step 3 stops the run at the next
    read (step 5), naming step 3 and 'gradient'; nothing is saved."""
    from engine.loop import NonFiniteLoss

    inject_nonfinite(monkeypatch, inf_step=3)
    out = tmp_path / "stop"
    with pytest.raises(NonFiniteLoss, match="non-finite gradient nan/inf at step 3 "):
        _train(tiny_betons, out, "run.max_steps=5", "run.log_every=5", "engine.graph_step=emulate")
    assert [(r["step"], r["what"], r["action"]) for r in _records(out, "nonfinite")] == [(3, "gradient", "stopped")]
    assert not (out / "checkpoints").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing a CUDA graph needs a CUDA device")
def test_captured_step_gives_the_losses_of_the_emulated_step_on_cuda(tiny_betons, tmp_path, caplog):
    """On CUDA: engine.graph_step=on warms up, captures and replays; its 20 losses match the same static step run
    eagerly (emulate) to 1e-4 relative (the Triton drloc backward accumulates with atomics, so not bitwise;
    drop-path off so that both draw nothing at random but drloc's hashed pairs)."""
    common = ("engine.device=cuda", "model.drop_path=0.0", f"run.max_steps={STEPS}")
    with caplog.at_level(logging.INFO, logger="smallvit"):
        _train(tiny_betons, tmp_path / "on", *common, "engine.graph_step=on")
    assert any("captured the training step" in r.getMessage() for r in caplog.records)
    _train(tiny_betons, tmp_path / "emulated", *common, "engine.graph_step=emulate")
    a, b = _losses(tmp_path / "on"), _losses(tmp_path / "emulated")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([a[s] for s in a]), torch.tensor([b[s] for s in a]), rtol=1e-4,
                               atol=1e-5)
