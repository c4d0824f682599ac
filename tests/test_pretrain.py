"""The DINO pretraining loop (engine/pretrain.py) on the CPU accelerator: outputs, the exported teacher, the
last-layer freeze, exact resume, config errors, and every backbone family.

Tiny model (depth 1-2, width 32) on the 96-image random set, 2 local crops: these check mechanics, not learning;
tests/test_pretrain_learns.py checks that the loss falls and the k-NN probe beats random init on real images."""
import json

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoint
from engine.config import ConfigError, config_from_dict
from engine.run_log import read_metrics

STEPS_PER_EPOCH = 96 // 16


def _overrides(betons, out_dir, *extra) -> list[str]:
    return [
        f"data.train={betons['train']}", f"data.test={betons['test']}", "data.dataset=tiny", "data.loader=resident",
        "data.batch_size=16", "data.eval_batch_size=48", "data.multicrop=true", "data.local_crops=2",
        "data.crop_padding=0", "data.flip=false", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
        "ssl.out_dim=64", "ssl.hidden_dim=32", "ssl.bottleneck_dim=16", "ssl.warmup_teacher_temp_epochs=2",
        "optim.epochs=2", "optim.warmup_epochs=1", "optim.lr=1e-3", "optim.weight_decay=0.04", "optim.clip_grad=3.0",
        "engine.precision=fp32", f"run.out_dir={out_dir}", "run.progress=false", "run.log_every=1", *extra]


def _cfg(betons, out_dir, *extra):
    return config_from_dict({}, _overrides(betons, out_dir, *extra))


def _student_weights(folder) -> dict[str, torch.Tensor]:
    """The student's weights from DeepSpeed's module file in a checkpoint folder."""
    path = next((folder / "ds").rglob("mp_rank_00_model_states.pt"))
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def full_run(tiny_betons, tmp_path_factory):
    from engine.pretrain import pretrain

    out = tmp_path_factory.mktemp("ssl") / "run"
    summary = pretrain(_cfg(tiny_betons, out))
    return out, summary


def test_run_writes_logs_knn_checkpoint_and_curves(full_run):
    out, summary = full_run
    assert summary["exit_code"] == 0 and summary["epochs_done"] == 2
    assert summary["global_step"] == 2 * STEPS_PER_EPOCH and summary["stage"] == "pretrain"
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for key in ("loss", "teacher_entropy", "teacher_batch_entropy", "center_norm", "lr", "weight_decay", "momentum",
                "teacher_temp"):
        assert all(key in r for r in train), key
    assert train[0]["teacher_temp"] == pytest.approx(0.04) and train[-1]["teacher_temp"] == pytest.approx(0.07)
    assert train[0]["momentum"] == pytest.approx(0.996) and train[-1]["momentum"] > 0.999
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2] and all(0 <= r["knn_top1"] <= 100 for r in evals)
    assert (out / "curves.png").stat().st_size > 0
    assert summary["knn_top1"] == evals[-1]["knn_top1"]


def test_checkpoint_exports_the_teacher_backbone_without_head(full_run):
    out, _ = full_run
    folder = checkpoint.find(out)
    state = checkpoint.read_state(folder)
    assert state["stage"] == "pretrain" and state["center"].shape == (1, 64)
    exported = load_file(str(folder / checkpoint.EXPORT_FILE))
    teacher = state["teacher"]
    backbone = {k.removeprefix("backbone.backbone."): v for k, v in teacher.items()
                if k.startswith("backbone.backbone.")}
    assert set(exported) == set(backbone)                      # the plain model's names, no DINO head
    assert not any(k.startswith("head.") for k in teacher if k.startswith("backbone.backbone.head"))
    for key, value in exported.items():
        assert torch.equal(value, backbone[key]), key
    # the teacher is an EMA of the student, not the student itself
    student = _student_weights(folder)
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher if k in student)


def test_last_layer_frozen_in_epoch_0_only(tiny_betons, tmp_path):
    """ssl.freeze_last_layer=1: after epoch 0 the student's last layer is still its initial value while the rest
    moved; after epoch 1 it moved too."""
    from engine.pretrain import build_network, pretrain

    out = tmp_path / "run"
    cfg = _cfg(tiny_betons, out, f"run.max_steps={STEPS_PER_EPOCH}")
    pretrain(cfg)
    torch.manual_seed(cfg.run.seed)
    initial = build_network(cfg, cfg.model.drop_path).state_dict()
    after_0 = _student_weights(checkpoint.find(out))
    assert torch.equal(after_0["head.last_layer.weight_v"], initial["head.last_layer.weight_v"])
    assert not torch.equal(after_0["head.mlp.0.weight"], initial["head.mlp.0.weight"])
    pretrain(_cfg(tiny_betons, out, "run.resume=auto", f"run.max_steps={STEPS_PER_EPOCH + 1}"))
    after_1 = _student_weights(checkpoint.find(out))
    assert not torch.equal(after_1["head.last_layer.weight_v"], initial["head.last_layer.weight_v"])


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(full_run, tiny_betons, tmp_path):
    """Stop mid-epoch 0 (step 4), resume: the losses of steps 5..12, the final teacher, centre and student equal
    the uninterrupted run's bitwise (schedules, centre and EMA all restored)."""
    from engine.pretrain import pretrain

    ref_out, _ = full_run
    out = tmp_path / "run"
    pretrain(_cfg(tiny_betons, out, "run.max_steps=4"))
    pretrain(_cfg(tiny_betons, out, "run.resume=auto"))
    ref = {r["step"]: r["loss"] for r in read_metrics(ref_out / "metrics.jsonl") if r["kind"] == "train"}
    got = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}
    assert [got[s] for s in range(5, 2 * STEPS_PER_EPOCH + 1)] == [ref[s] for s in range(5, 2 * STEPS_PER_EPOCH + 1)]
    a, b = checkpoint.read_state(checkpoint.find(ref_out)), checkpoint.read_state(checkpoint.find(out))
    assert torch.equal(a["center"], b["center"])
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key
    sa, sb = _student_weights(checkpoint.find(ref_out)), _student_weights(checkpoint.find(out))
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("override,key", [
    ("data.multicrop=false", "data.multicrop"), ("engine.zero_stage=1", "engine.zero_stage"),
    ("data.mixup_alpha=1.0", "data.mixup_alpha"), ("tasks.drloc.enabled=true", "tasks.")])
def test_config_errors_name_the_key(tiny_betons, tmp_path, override, key):
    from engine.pretrain import pretrain

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pretrain(_cfg(tiny_betons, tmp_path / "run", override))
    assert not (tmp_path / "run").exists()


def test_a_supervised_checkpoint_is_not_resumed_as_pretraining(tiny_betons, tmp_path, full_run):
    from engine.pretrain import pretrain
    from engine.train import train

    out = tmp_path / "sup"
    train(config_from_dict({}, [f"data.train={tiny_betons['train']}", f"data.test={tiny_betons['test']}",
                                "data.dataset=tiny", "data.loader=resident", "data.batch_size=16",
                                "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "engine.precision=fp32",
                                "optim.epochs=1", "optim.warmup_epochs=0", "run.max_steps=1", f"run.out_dir={out}", "run.progress=false"]))
    with pytest.raises(ConfigError, match="not a pretraining checkpoint"):
        pretrain(_cfg(tiny_betons, out, "run.resume=auto"))


@pytest.mark.parametrize("name,extra", [("swin_cifar", []), ("cait_cifar", ["model.depth=2"]),
                                        ("vit_cifar", ["model.spt=true", "model.lsa=true"])])
def test_every_backbone_family_pretrains_a_step(tiny_betons, tmp_path, name, extra):
    """Swin (window attention at the half-size local crops), CaiT and SPT+LSA ViT through two steps."""
    from engine.pretrain import pretrain

    cfg = config_from_dict({}, [
        f"data.train={tiny_betons['train']}", f"data.test={tiny_betons['test']}", "data.dataset=tiny",
        "data.loader=resident", "data.batch_size=8", "data.multicrop=true", "data.local_crops=2",
        "data.crop_padding=0", "data.flip=false", f"model.name={name}", "ssl.out_dim=32", "ssl.hidden_dim=16",
        "ssl.bottleneck_dim=8", "optim.epochs=1", "optim.warmup_epochs=0", "engine.precision=fp32", "run.max_steps=2",
        f"run.out_dir={tmp_path / 'run'}", "run.progress=false", "run.log_every=1", *extra])
    summary = pretrain(cfg)
    assert summary["global_step"] == 2
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 2 and all(l == l and l > 0 for l in losses)


def test_finetune_from_the_pretraining_run_loads_the_teacher_backbone(full_run, tiny_betons, tmp_path):
    """The real hand-off: `model.finetune_from=<pretraining run>` loads every backbone tensor of the exported
    teacher (only the new classifier is missing), and the fine-tuned model starts from those weights."""
    from engine.models.pretrained import REPORT_FILE
    from engine.train import train

    ssl_out, _ = full_run
    out = tmp_path / "finetune"
    summary = train(config_from_dict({}, [
        f"data.train={tiny_betons['train']}", f"data.test={tiny_betons['test']}", "data.dataset=tiny",
        "data.loader=resident", "data.batch_size=16", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
        f"model.finetune_from={ssl_out}", "tasks.drloc.enabled=true", "engine.precision=fp32", "optim.epochs=1",
        "optim.warmup_epochs=0", "run.max_steps=1", f"run.out_dir={out}", "run.progress=false"]))
    assert summary["global_step"] == 1
    report = json.loads((out / REPORT_FILE).read_text())
    exported = load_file(str(checkpoint.find(ssl_out) / checkpoint.EXPORT_FILE))
    assert sorted(report["loaded"]) == sorted(exported)
    assert sorted(report["missing"]) == ["head.bias", "head.weight"]
    assert report["unexpected"] == [] and report["mismatched"] == []


@pytest.mark.parametrize("fail", [True, False])
def test_nonfinite_gradient_stops_or_skips_without_touching_student_teacher_or_centre(tiny_betons, tmp_path, fail,
                                                                                     monkeypatch):
    """An Inf injected into one gradient at step 3: the run stops naming step 3 (default), or with
    engine.fail_on_nonfinite=false skips it — counted, and the student, teacher and centre equal a run that
    stopped before it."""
    import engine.pretrain as pretrain_module
    from engine.loop import NonFiniteLoss

    real_clip = pretrain_module.GradientCheck

    class PoisonedCheck(real_clip):
        """Sees step 3's gradients as containing an Inf (the check is what the loop trusts)."""
        calls = 0

        def finite(self):
            PoisonedCheck.calls += 1
            result = super().finite()
            return result and PoisonedCheck.calls != 3

    monkeypatch.setattr(pretrain_module, "GradientCheck", PoisonedCheck)
    out = tmp_path / "run"
    if fail:
        with pytest.raises(NonFiniteLoss, match="gradient .* at step 3 "):
            pretrain_module.pretrain(_cfg(tiny_betons, out, "run.max_steps=4"))
        return
    summary = pretrain_module.pretrain(_cfg(tiny_betons, out, "run.max_steps=3", "engine.fail_on_nonfinite=false"))
    assert summary["nonfinite_skipped"] == 1
    monkeypatch.setattr(pretrain_module, "GradientCheck", real_clip)
    before = tmp_path / "before"
    pretrain_module.pretrain(_cfg(tiny_betons, before, "run.max_steps=2"))
    a, b = checkpoint.read_state(checkpoint.find(out)), checkpoint.read_state(checkpoint.find(before))
    assert torch.equal(a["center"], b["center"])
    assert all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a["teacher"])
    sa, sb = _student_weights(checkpoint.find(out)), _student_weights(checkpoint.find(before))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_through_the_launcher_equal_one_rank(tiny_betons, tmp_path):
    """`deepspeed --num_gpus 2 engine/pretrain.py` (gloo): the same global batch split over 2 ranks gives the
    1-rank run's losses at every step (gradients averaged before clipping, the centre averaged over ranks, the EMA
    of identical students), and the k-NN evaluation on the main rank does not hang the other."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from conftest import subprocess_env

    repo = Path(__file__).resolve().parents[1]
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        overrides = _overrides(tiny_betons, out)
        cmd = (["deepspeed", "--num_gpus", "2", "--master_port", str(port)] if ranks == 2 else [sys.executable])
        res = subprocess.run([*cmd, str(repo / "engine" / "pretrain.py"), *overrides, "model.drop_path=0.0",
                              f"run.max_steps={STEPS_PER_EPOCH}", "optim.epochs=1", "optim.warmup_epochs=0"],
                             cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        runs[ranks] = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}
        assert any(r["kind"] == "eval" for r in read_metrics(out / "metrics.jsonl"))
    assert sorted(runs[2]) == list(range(1, STEPS_PER_EPOCH + 1))
    for step, loss in runs[1].items():
        assert runs[2][step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_exactly(full_run, tiny_betons, tmp_path, monkeypatch):
    """A SIGTERM seen at the boundary after step 3: exit code 143 with a checkpoint at step 3; the resumed run's
    later losses equal the uninterrupted run's."""
    import signal

    import engine.pretrain as pretrain_module
    from engine.loop import EXIT_INTERRUPTED

    class TermAfterStep3(pretrain_module.StopFlag):
        """Reads as SIGTERM from the 3rd step-boundary check on (what the handler would have set)."""

        def __init__(self):
            super().__init__()
            self._checks = 0

        @property
        def signal(self):
            self._checks += 1
            return signal.SIGTERM if self._checks >= 3 else None

        @signal.setter
        def signal(self, value):
            pass

    out = tmp_path / "run"
    monkeypatch.setattr(pretrain_module, "StopFlag", TermAfterStep3)
    summary = pretrain_module.pretrain(_cfg(tiny_betons, out))
    assert summary["exit_code"] == EXIT_INTERRUPTED and summary["global_step"] == 3
    assert checkpoint.read_state(checkpoint.find(out))["global_step"] == 3
    monkeypatch.undo()
    assert pretrain_module.pretrain(_cfg(tiny_betons, out, "run.resume=auto"))["exit_code"] == 0
    ref_out, _ = full_run
    ref = {r["step"]: r["loss"] for r in read_metrics(ref_out / "metrics.jsonl") if r["kind"] == "train"}
    got = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}
    assert [got[s] for s in range(4, 2 * STEPS_PER_EPOCH + 1)] == [ref[s] for s in range(4, 2 * STEPS_PER_EPOCH + 1)]
