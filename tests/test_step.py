"""The training step: gradient accumulation, a user's DeepSpeed JSON, the one bf16 scheme, task weights in the logs,
and the default step's host syncs (issue 21 items 3, 4, 16; issue 25 items 4, 9).

Tiny runs on the CPU: a 1-block ViT of width 16 on the 96-image `tiny_betons` set, batch 8, a few steps.
"""
from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch

from engine.config import ConfigError, config_from_dict
from engine.run_log import read_metrics
from test_fake_cuda_engine import fake_cuda  # noqa: F401 - the fixture, for the default step's sync test


def _cfg(betons, out, *extra):
    return config_from_dict({}, [
        f"data.train={betons['train']}", f"data.test={betons['test']}", "data.dataset=tiny", "data.loader=resident",
        "data.batch_size=8", "data.eval_batch_size=48", "model.depth=1", "model.embed_dim=16", "model.num_heads=2",
        "model.drop_path=0.0", "optim.epochs=9", "optim.warmup_epochs=1", "engine.precision=fp32",
        "engine.device=cpu", "run.progress=false", "run.log_every=1", f"run.out_dir={out}", *extra])


def _train(betons, out, *extra):
    from engine.train import train

    torch.set_num_threads(1)
    return train(_cfg(betons, out, *extra))


def _records(out, kind="train"):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == kind]


def _ds_json(tmp_path, name="ds.json", **content) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return str(path)


# ------------------------------------------------------------------------------------ gradient accumulation
def _engine_and_step(cfg, seed=0):
    import deepspeed

    from engine.models import create_model
    from engine.runtime import deepspeed_config, init_runtime
    from engine.supervised_step import SupervisedStep
    from engine.tasks import build_tasks
    from engine.train import param_groups
    from engine.train_module import TrainModule

    rt = init_runtime("cpu")
    torch.manual_seed(seed)
    model = create_model("vit_cifar", num_classes=4, drop_path=0.0, depth=1, embed_dim=16, num_heads=2)
    module = TrainModule(model, build_tasks(cfg, model.embed_dim, model.grid_size), 0.1)
    optimizer = torch.optim.AdamW(param_groups(module, 0.05), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(cfg, 1))
    step = SupervisedStep(engine, optimizer, rt.device, torch.float32, fail_on_nonfinite=True,
                          zero_stage=cfg.engine.zero_stage, clip=cfg.optim.clip_grad,
                          accumulation_steps=cfg.optim.accumulation_steps)
    return engine, step


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_k_micro_batches_of_b_equal_one_step_of_k_times_b(zero_stage):
    """optim.accumulation_steps=4 over a batch of 16 (micro-batches of 4, each its own forward) gives the loss and
    the parameters after each of two steps of one step over all 16 images (fp32, clipping on, ZeRO 0 and 1)."""
    from loaders.batch import Batch

    keys = ["data.batch_size=16", "engine.precision=fp32", "optim.clip_grad=0.5", f"engine.zero_stage={zero_stage}"]
    one = _engine_and_step(config_from_dict({}, keys))
    acc = _engine_and_step(config_from_dict({}, [*keys, "optim.accumulation_steps=4"]))
    assert acc[0].gradient_accumulation_steps() == 4 and acc[0].train_micro_batch_size_per_gpu() == 4
    start = [p.detach().clone() for p in one[0].module.parameters()]
    forwards = []
    acc[0].module.register_forward_hook(lambda _m, inputs, _out: forwards.append(len(inputs[0])))
    g = torch.Generator().manual_seed(1)
    for s in range(2):
        batch = Batch(images=torch.randn(16, 3, 32, 32, generator=g), labels=torch.randint(0, 4, (16,), generator=g),
                      index=torch.arange(16))
        for engine, step in (one, acc):
            assert step.step(batch, 1e-3, s, 1.0, s, report=pytest.fail)
    assert forwards == [4] * 8
    losses = [step.read().means["loss"] for _, step in (one, acc)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
    for (n, p), (_, q) in zip(one[0].module.named_parameters(), acc[0].module.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.equal(p, q) for p, q in zip(start, one[0].module.parameters()))   # the steps did train


def test_deepspeed_json_accumulation_trains_instead_of_stopping_at_step_1(tiny_betons, tmp_path):
    """A user JSON with gradient_accumulation_steps: 2 stopped the run at step 1 ("non-finite gradient (found by
    DeepSpeed) overflow", exit 3): now it trains, as optim.accumulation_steps=2 does, to the same losses, which
    equal those of the run without accumulation (to rounding)."""
    ds = _ds_json(tmp_path, gradient_accumulation_steps=2)
    runs = {}
    for name, extra in (("json", [f"engine.deepspeed_config={ds}"]), ("key", ["optim.accumulation_steps=2"]),
                        ("none", [])):
        summary = _train(tiny_betons, tmp_path / name, "run.max_steps=3", *extra)
        assert summary["global_step"] == 3 and summary["nonfinite_skipped"] == 0 and summary["exit_code"] == 0
        runs[name] = [r["loss"] for r in _records(tmp_path / name)]
    assert runs["json"] == runs["key"] and len(runs["json"]) == 3
    assert runs["none"] == pytest.approx(runs["key"], rel=1e-5)


def test_accumulation_that_does_not_divide_the_batch_is_refused_naming_both_keys(tiny_betons, tmp_path, capsys):
    from engine.train import run_training

    out = tmp_path / "run"
    assert run_training(_cfg(tiny_betons, out, "optim.accumulation_steps=3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.batch_size" in err[0] and "optim.accumulation_steps" in err[0], err
    with pytest.raises(ConfigError, match="optim.accumulation_steps"):
        _cfg(tiny_betons, out, "optim.accumulation_steps=0")


def test_graphed_step_falls_back_under_accumulation_with_its_reason(tiny_betons, tmp_path):
    from engine.graphed_step import plan_graph_step

    plan = plan_graph_step(_cfg(tiny_betons, tmp_path, "optim.accumulation_steps=2", "engine.graph_step=emulate"),
                           1, torch.device("cpu"), 96)
    assert plan.mode == "off" and plan.reason.startswith("optim.accumulation_steps=2:") and "\n" not in plan.reason


# ------------------------------------------------------------------------------------- a user's DeepSpeed JSON
def test_user_json_is_merged_over_ours(tmp_path):
    """Unmapped keys pass through (nested sections merged key by key), the mapped ones resolve into the config
    where ours is at its default, and DeepSpeed's own bf16 mode stays off (torch autocast does bf16)."""
    from engine.deepspeed_json import resolve_into_config
    from engine.runtime import deepspeed_config

    ds = _ds_json(tmp_path, gradient_accumulation_steps=2, train_batch_size=32, gradient_clipping=1.5,
                  zero_optimization={"stage": 1, "reduce_bucket_size": 12345}, bf16={"enabled": False},
                  communication_data_type="fp32")
    cfg = resolve_into_config(config_from_dict({}, [f"engine.deepspeed_config={ds}"]))
    assert (cfg.optim.accumulation_steps, cfg.data.batch_size, cfg.optim.clip_grad, cfg.engine.zero_stage,
            cfg.engine.precision) == (2, 32, 1.5, 1, "fp32")
    merged = deepspeed_config(cfg, 2)
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 12345}
    assert merged["communication_data_type"] == "fp32" and merged["gradient_clipping"] == 1.5
    assert (merged["train_batch_size"], merged["train_micro_batch_size_per_gpu"],
            merged["gradient_accumulation_steps"]) == (32, 8, 2)
    assert merged["bf16"] == {"enabled": False} and merged["steps_per_print"] == 10**9
    bf16 = resolve_into_config(config_from_dict({}, [f"engine.deepspeed_config={_ds_json(tmp_path, 'b.json', bf16={'enabled': True})}"]))
    assert bf16.engine.precision == "bf16" and deepspeed_config(bf16, 1)["bf16"] == {"enabled": False}


@pytest.mark.parametrize("content,ours,names", [
    ({"optimizer": {"type": "SGD", "params": {"lr": 0.5}}}, [], ["'optimizer'", "optim."]),
    ({"scheduler": {"type": "WarmupLR"}}, [], ["'scheduler'", "optim.lr"]),
    ({"fp16": {"enabled": True}}, [], ["'fp16'", "engine.precision=bf16"]),
    ({"train_batch_size": 64}, ["data.batch_size=32"], ["'train_batch_size'", "data.batch_size"]),
    ({"gradient_accumulation_steps": 2}, ["optim.accumulation_steps=4"],
     ["'gradient_accumulation_steps'", "optim.accumulation_steps"]),
    ({"zero_optimization": {"stage": 2}}, ["engine.zero_stage=1"], ["'zero_optimization.stage'", "engine.zero_stage"]),
    ({"bf16": {"enabled": True}}, ["engine.precision=fp32"], ["'bf16.enabled'", "engine.precision"]),
    ({"gradient_clipping": 1.0}, ["optim.clip_grad=2.0"], ["'gradient_clipping'", "optim.clip_grad"]),
])
def test_user_json_conflicts_and_unsupported_keys_are_refused_naming_them(tmp_path, content, ours, names):
    from engine.deepspeed_json import resolve_into_config

    ds = _ds_json(tmp_path, **content)
    with pytest.raises(ConfigError) as info:
        resolve_into_config(config_from_dict({}, [f"engine.deepspeed_config={ds}", *ours]))
    message = str(info.value)
    assert message.startswith("engine.deepspeed_config:") and ds in message and "\n" not in message
    assert all(name in message for name in names), message


def test_micro_batch_that_disagrees_with_ours_is_refused(tmp_path):
    from engine.deepspeed_json import resolve_into_config
    from engine.runtime import deepspeed_config

    ds = _ds_json(tmp_path, train_micro_batch_size_per_gpu=16)
    cfg = resolve_into_config(config_from_dict({}, [f"engine.deepspeed_config={ds}", "data.batch_size=64"]))
    assert deepspeed_config(cfg, 4)["train_micro_batch_size_per_gpu"] == 16
    with pytest.raises(ConfigError, match=r"'train_micro_batch_size_per_gpu' to 16 but data.batch_size 64 / \(2 "):
        deepspeed_config(cfg, 2)


def test_a_refused_json_stops_train_with_one_line_and_nothing_on_disk(tiny_betons, tmp_path, capsys):
    from engine.train import run_training

    ds = _ds_json(tmp_path, optimizer={"type": "SGD", "params": {"lr": 0.5}})
    out = tmp_path / "run"
    assert run_training(_cfg(tiny_betons, out, f"engine.deepspeed_config={ds}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smallvit: error: engine.deepspeed_config:") and "'optimizer'" in err[0]
    assert not out.exists()


def test_launcher_takes_deepspeeds_own_flags(tmp_path, capsys, monkeypatch):
    """`deepspeed engine/train.py --deepspeed --deepspeed_config ds.json ...` (deepspeed.add_config_arguments):
    the file becomes engine.deepspeed_config; another file named by the config as well is refused naming both."""
    import engine.loop
    from engine.loop import launcher_main

    # the process group of this test process stays (DeepSpeed caches its groups for the later tests)
    monkeypatch.setattr(engine.loop, "close_process_group", lambda: None)
    ds = _ds_json(tmp_path, gradient_accumulation_steps=2)
    seen = []
    assert launcher_main(["--deepspeed", "--deepspeed_config", ds, "optim.lr=5e-4"], "t",
                         lambda cfg: seen.append(cfg) or 0) == 0
    assert seen[0].engine.deepspeed_config == ds and seen[0].optim.lr == 5e-4
    other = _ds_json(tmp_path, "other.json")
    assert launcher_main(["--deepspeed_config", ds, f"engine.deepspeed_config={other}"], "t",
                         lambda cfg: pytest.fail("must not run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--deepspeed_config" in err[0] and "engine.deepspeed_config" in err[0], err


# ------------------------------------------------------------------------------------------- one bf16 scheme
@pytest.fixture
def cpu_bf16(monkeypatch):
    import engine.precision

    monkeypatch.setattr(engine.precision, "_CPU_BF16", True)


def _watch_engine(monkeypatch):
    """Wrap deepspeed.initialize: record the engine, the dtypes of its Linear outputs and of every gradient."""
    import deepspeed

    seen = {"linear": set(), "grad": set(), "engine": None}
    real = deepspeed.initialize

    def initialize(*args, **kwargs):
        out = real(*args, **kwargs)
        engine = seen["engine"] = out[0]
        for m in engine.module.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda _m, _i, o: seen["linear"].add(o.dtype))
        for p in engine.module.parameters():
            if p.requires_grad:
                p.register_hook(lambda g: seen["grad"].add(g.dtype))
        return out
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    return seen


def test_bf16_is_one_scheme_on_both_step_paths(tiny_betons, tmp_path, cpu_bf16, monkeypatch):
    """engine.precision=bf16 with the graphed step off (DeepSpeed's eager step) and emulated (the static step):
    bf16 compute, fp32 parameters, gradients and exported model.safetensors on both, and the same losses.
    DeepSpeed's bf16 mode held the module in bf16 on the eager path."""
    from safetensors.torch import load_file

    keys = ["engine.precision=bf16", "run.max_steps=3", "optim.clip_grad=0.5", "tasks.drloc.enabled=true",
            "tasks.drloc.hidden=16", "tasks.drloc.pairs=8"]
    losses, dtypes = {}, {}
    for path in ("off", "emulate"):
        seen = _watch_engine(monkeypatch)
        out = tmp_path / path
        _train(tiny_betons, out, *keys, f"engine.graph_step={path}")
        losses[path] = [r["loss"] for r in _records(out)]
        exported = load_file(str(next((out / "checkpoints").glob("*/model.safetensors"))))
        dtypes[path] = (seen["linear"], seen["grad"], {p.dtype for p in seen["engine"].module.parameters()},
                        {t.dtype for t in exported.values()})
    assert dtypes["off"] == dtypes["emulate"] == ({torch.bfloat16}, {torch.float32}, {torch.float32},
                                                  {torch.float32}), dtypes
    assert len(losses["off"]) == 3 and losses["off"] == losses["emulate"]


def test_deepspeeds_bf16_mode_is_never_asked_for():
    from engine.runtime import deepspeed_config

    cfg = config_from_dict({}, ["engine.precision=bf16"])
    assert deepspeed_config(cfg, 1)["bf16"] == {"enabled": False}


# ------------------------------------------------------------------------------------------ task weights
def test_task_weights_are_logged_and_a_short_run_warns_once_per_task(tiny_betons, tmp_path, caplog):
    """Each train line carries every task's weight at its step; a run stopped at epoch 1.17 of 6 warns for both
    tasks (drloc ramps over 20 epochs; perceptibility over 20% of optim.epochs, 1.2 epochs)."""
    from engine.tasks.drloc import drloc_weight

    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="smallvit"):
        _train(tiny_betons, out, "optim.epochs=6", "run.max_steps=14", "tasks.drloc.enabled=true",
               "tasks.drloc.hidden=16", "tasks.drloc.pairs=8", "tasks.perceptibility.enabled=true",
               "tasks.perceptibility.hidden=16")
    records = _records(out)
    assert len(records) == 14
    assert [r["drloc_weight"] for r in records] == [drloc_weight(0 if r["step"] <= 12 else 1, 0.1, 6)
                                                    for r in records]
    assert records[-1]["drloc_weight"] == pytest.approx(0.1 / 20) and records[0]["perceptibility_weight"] == 0.0
    assert records[-1]["perceptibility_weight"] == pytest.approx(1.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tasks.")]
    assert len(lines) == 2, lines
    assert lines[0] == ("tasks.drloc: the run ends at epoch 1.16667 (optim.epochs / run.max_steps) before the "
                        "weight's ramp does: its weight reaches at most 0.005 of the 0.1 it ramps to")
    assert lines[1].startswith("tasks.perceptibility:") and "at most 1 of the 1.2" in lines[1]


def test_ramp_check_on_schedules_alone():
    """Without a run: a whole 10-epoch run reaches perceptibility's peak (its ramp is 20% of optim.epochs) but not
    drloc's (20 epochs, 9/20 of lambda0); 30 epochs reach both; run.max_steps short of the ramp warns."""
    from engine.tasks import build_tasks
    from engine.tasks.ramps import ramp_warnings

    both = ["tasks.drloc.enabled=true", "tasks.perceptibility.enabled=true", "optim.warmup_epochs=1"]
    tasks10 = build_tasks(config_from_dict({}, ["optim.epochs=10", *both]), 16, 8)
    lines = ramp_warnings(tasks10, 10, 100)
    assert len(lines) == 1 and lines[0].startswith("tasks.drloc:") and "at most 0.045 of the 0.1" in lines[0]
    tasks30 = build_tasks(config_from_dict({}, ["optim.epochs=30", *both]), 16, 8)
    assert ramp_warnings(tasks30, 10, 300) == []
    assert [line.split(":")[0] for line in ramp_warnings(tasks30, 10, 50)] == ["tasks.drloc", "tasks.perceptibility"]


# --------------------------------------------------------------------------------- host syncs of the step
def test_deepspeed_engine_makes_no_device_synchronize_in_the_default_step(monkeypatch):
    """DeepSpeed's throughput timer synchronized the device at every forward and step (timers.throughput, on by
    default): our config turns it off, so DeepSpeed's engine itself calls no accelerator synchronize in a step."""
    from deepspeed.accelerator import get_accelerator

    from loaders.batch import Batch

    engine, step = _engine_and_step(config_from_dict({}, ["data.batch_size=8", "engine.precision=fp32"]))
    calls = []
    accel = get_accelerator()
    monkeypatch.setattr(type(accel), "synchronize", lambda self, *a, **k: calls.append(1))
    batch = Batch(images=torch.randn(8, 3, 32, 32), labels=torch.arange(8) % 4, index=torch.arange(8))
    for s in range(3):
        step.step(batch, 1e-3, s, 1.0, s, report=pytest.fail)
    assert calls == [] and step.read().steps == 3


class _StandInEngine:
    """DeepSpeed's engine as the default step drives it with ZeRO 0 (forward, backward, step: clipping off in
    DeepSpeed, the optimizer's step, gradients set to None), for fake CUDA tensors, which DeepSpeed itself cannot
    be built on. What DeepSpeed's own engine adds was checked above (no accelerator synchronize in a step)."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        for p in self.module.parameters():
            p.grad = None

    def set_gradient_accumulation_boundary(self, is_boundary):
        pass

    def was_step_applied(self):
        return True


@pytest.mark.parametrize("accumulation,prec", [(1, "bf16"), (2, "fp32")])
def test_default_step_makes_no_host_sync_between_log_points_on_fake_cuda(accumulation, prec, fake_cuda, monkeypatch):
    """The default training step as train() builds it on CUDA (fused AdamW, engine.fail_on_nonfinite, ZeRO 0, clip
    on, drloc and perceptibility on): after the first step (AdamW's state and the accumulators are allocated) a step
    makes no host sync (the guard of tests/test_fake_cuda_engine.py), the skip flag reaches AdamW as found_inf on
    the device, and read() then returns the window (the one sync, at a log point)."""
    import test_fake_cuda_engine as fc

    from engine.supervised_step import SupervisedStep
    from engine.train import param_groups

    module = fc.train_module("vit")
    calls: list = []
    with fake_cuda:
        module = module.to("cuda")
        optimizer = torch.optim.AdamW(param_groups(module, 0.05), lr=1e-3, fused=True)
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        step = SupervisedStep(_StandInEngine(module, optimizer), optimizer, fc.CUDA, dtype, fail_on_nonfinite=True,
                              zero_stage=0, clip=1.0, accumulation_steps=accumulation)
        assert step.device_skip
        monkeypatch.setattr(torch.Tensor, "backward", fc.write_gradients(module))
        contract = fc.fused_adamw_contract(calls)

        def fused_adamw_(*args, lr, **kwargs):   # the CUDA op's float-lr overload: the LR is a kernel argument
            if not isinstance(lr, torch.Tensor):
                lr = torch.full((), lr, dtype=torch.float32, device=fc.CUDA)
            return contract(*args, lr=lr, **kwargs)
        monkeypatch.setattr(torch, "_fused_adamw_", fused_adamw_)
        for s in range(3):
            batch = fc.make_batch(n=4)
            with fc.linear_output_dtypes(module.model) as dtypes, fc.no_step_sync() if s else contextlib.nullcontext():
                assert step.step(batch, 1e-3, 1000 + s, 5.0, s, report=pytest.fail)
            assert set(dtypes) == {dtype}
        w = step.window
        assert {t.device for t in (w.sums, w.ok_steps, w.nonfinite, w.first_bad, step.halted)} == {fc.CUDA}
        assert w.names[:2] == ["loss", "cls_loss"]
        # the guard is not vacuous: the host check (engine.fail_on_nonfinite=false) reads each step's loss
        checked = SupervisedStep(_StandInEngine(module, optimizer), optimizer, fc.CUDA, dtype,
                                 fail_on_nonfinite=False, zero_stage=0, clip=1.0, accumulation_steps=accumulation)
        with pytest.raises(fc.HostSyncError), fc.no_step_sync():
            checked.step(fc.make_batch(n=4), 1e-3, 7, 5.0, 3, report=pytest.fail)
    calls = calls[:3 * len(optimizer.param_groups)]
    assert calls == [{"params": len(g["params"]), "found_inf": True} for _ in range(3) for g in optimizer.param_groups]


def test_default_pretraining_step_makes_no_host_sync_between_log_points_on_fake_cuda(fake_cuda, monkeypatch):
    """pretrain()'s step as built on CUDA (fused AdamW, engine.fail_on_nonfinite, bf16 autocast, DINO's
    per-parameter clipping, the last layer frozen): teacher and student forward, loss, backward, clip, AdamW, EMA
    and centre make no host sync after the first step; the flag reaches AdamW as found_inf; the read at a log point
    returns no non-finite step. The host check (fail_on_nonfinite=false) does sync: the guard is not vacuous."""
    import test_fake_cuda_engine as fc

    from engine.ssl.loss import DINOLoss
    from engine.ssl.step import DINOStep
    from engine.train import param_groups

    torch.manual_seed(0)
    student, teacher = fc.dino_network("vit", 0.1), fc.dino_network("vit", 0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = DINOLoss(fc.OUT_DIM, 2, 0.1, 0.04, 0.07, 3, 0.9)
    calls: list = []
    with fake_cuda:
        student, teacher, loss_fn = student.to("cuda"), teacher.to("cuda"), loss_fn.to("cuda")
        optimizer = torch.optim.AdamW(param_groups(student, 0.04), lr=1e-3, fused=True)
        contract = fc.fused_adamw_contract(calls)

        def fused_adamw_(*args, lr, **kwargs):
            if not isinstance(lr, torch.Tensor):
                lr = torch.full((), lr, dtype=torch.float32, device=fc.CUDA)
            return contract(*args, lr=lr, **kwargs)
        monkeypatch.setattr(torch, "_fused_adamw_", fused_adamw_)
        monkeypatch.setattr(torch.Tensor, "backward", fc.write_gradients(student))
        step = DINOStep(_StandInEngine(student, optimizer), optimizer, teacher, loss_fn,
                        student.head.last_layer_parameters(), fc.CUDA, torch.bfloat16, fail_on_nonfinite=True,
                        clip_per_param=3.0, grad_check=None)
        assert step.device_skip

        def crops():
            return ([torch.randn(4, 3, 32, 32, device="cuda") for _ in range(2)]
                    + [torch.randn(4, 3, 16, 16, device="cuda") for _ in range(2)])
        for s in range(3):
            c = crops()
            with fc.no_step_sync() if s else contextlib.nullcontext():
                assert step.step(c, 0, 0.996, s == 0, s, report=pytest.fail)
        assert {t.device for t in (step.halted, step.bad_steps.nonfinite, loss_fn.center, *teacher.parameters())} == {fc.CUDA}
        checked = DINOStep(_StandInEngine(student, optimizer), optimizer, teacher, loss_fn,
                           student.head.last_layer_parameters(), fc.CUDA, torch.bfloat16, fail_on_nonfinite=False,
                           clip_per_param=3.0, grad_check=None)
        with pytest.raises(fc.HostSyncError), fc.no_step_sync():
            checked.step(crops(), 0, 0.996, False, 3, report=pytest.fail)
    assert len(calls) == 3 * len(optimizer.param_groups) and all(c["found_inf"] for c in calls)


def test_device_skip_leaves_parameters_and_state_as_before_the_bad_step_and_read_names_it():
    """The device-skip path with a real DeepSpeed engine (a CPU fused AdamW stands in for CUDA's): a NaN loss at
    0-based step 1 leaves the parameters and AdamW's state as after step 0 through steps 1-3 (every later step is
    held too, under engine.fail_on_nonfinite), and read() reports the non-finite step 1, a loss."""
    import deepspeed

    from engine.models import create_model
    from engine.runtime import deepspeed_config, init_runtime
    from engine.supervised_step import SupervisedStep
    from engine.train import param_groups
    from engine.train_module import TrainModule
    from loaders.batch import Batch

    cfg = config_from_dict({}, ["data.batch_size=8", "engine.precision=fp32", "optim.clip_grad=1.0"])
    rt = init_runtime("cpu")
    torch.manual_seed(0)
    model = create_model("vit_cifar", num_classes=4, drop_path=0.0, depth=1, embed_dim=16, num_heads=2)
    module = TrainModule(model, torch.nn.ModuleList(), 0.1)
    optimizer = torch.optim.AdamW(param_groups(module, 0.05), lr=1e-3, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(cfg, 1))
    step = SupervisedStep(engine, optimizer, rt.device, torch.float32, fail_on_nonfinite=True, zero_stage=0,
                          clip=1.0)
    assert step.device_skip
    g = torch.Generator().manual_seed(2)
    snapshots = []
    for s in range(4):
        images = torch.randn(8, 3, 32, 32, generator=g)
        if s == 1:
            images[0, 0, 0, 0] = float("nan")
        step.step(Batch(images=images, labels=torch.arange(8) % 4, index=torch.arange(8)), 1e-3, s, 1.0, s,
                  report=pytest.fail)
        snapshots.append(([p.detach().clone() for p in module.parameters()],
                          [t.clone() for st in optimizer.state.values() for k, t in st.items() if k != "step"]))
    for later in snapshots[1:]:
        assert all(torch.equal(a, b) for a, b in zip(snapshots[0][0], later[0]))
        assert all(torch.equal(a, b) for a, b in zip(snapshots[0][1], later[1]))
    report = step.read()
    # one non-finite step, from step 1, a loss; the held steps after it had finite losses (the run stops at this read)
    assert (report.nonfinite, report.first_step, report.first_what, report.steps) == (1, 1, "loss", 3)
    assert all(torch.isfinite(p).all() for p in module.parameters())
