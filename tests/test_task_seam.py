"""The auxiliary-task seam (engine/tasks/registry.py): a task is one module plus one registry line.

(1) A toy task defined in this file alone -- its Config, check, head, loss, weight and a loader-side batch transform
    that adds one extra view (the flipped images) -- registered with `register("toy", ToyTask)`, enabled through the
    normal YAML + override path, trains two steps with DeepSpeed's step and two with the static step (emulated on the
    CPU): finite losses, its head's parameters changed, the two step paths bitwise equal. On CUDA, the same task in
    a captured graph gives the emulated step's losses (skipped without CUDA).
(2) The schema has tasks.toy.* while it is registered, and not otherwise.
(3) Which files of engine/, loaders/, bench/ and kernels/ name each built-in task: each within its allowed set.
(4) engine/config.py imports without importing the tasks' modules (or torch).
"""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from engine.config import ConfigError, config_from_dict, describe_options, load_config
from engine.run_log import read_metrics
from engine.tasks.base import AuxTask, TaskOutput
from engine.tasks.registry import BUILTIN, enabled, register, registered, unregister

ROOT = Path(__file__).resolve().parents[1]
VIEW = "toy_flipped"


# ----------------------------------------------------------------------------------------------- the toy task
@dataclass
class ToyConfig:
    enabled: bool = False
    weight: float = 0.5


class FlipTransform:
    """The toy's loader side: the horizontally flipped batch as one extra view, and a per-image target."""

    def __call__(self, images: torch.Tensor, keys: torch.Tensor):
        return {VIEW: images.flip(-1)}, {"toy_target": torch.ones(images.shape[0], 1, device=images.device)}


class ToyTask(AuxTask):
    """Tell the flipped pass from the clean one: a linear head on [mean tokens of the clean pass, of the flipped
    pass] -> one logit, BCE against the target the transform recorded (always 1), times a weight that grows with
    the (fractional) epoch, so that a replayed CUDA graph must read each step's weight from its buffer."""

    name = "toy"
    Config = ToyConfig
    views = (VIEW,)
    initial: list[dict[str, torch.Tensor]] = []   # each built head's parameters at construction

    @classmethod
    def check(cls, section: ToyConfig, cfg):
        return [("tasks.toy.weight", section.weight >= 0, "must be >= 0")]

    @classmethod
    def build(cls, cfg, embed_dim: int, grid: int) -> "ToyTask":
        task = cls(cfg.tasks.toy, embed_dim)
        cls.initial.append({k: v.detach().clone() for k, v in task.state_dict().items()})
        return task

    @classmethod
    def batch_transform(cls, section: ToyConfig, data):
        return FlipTransform()

    def __init__(self, cfg: ToyConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.head = nn.Linear(2 * embed_dim, 1)

    def weight(self, epoch: float) -> float:
        return self.cfg.weight * (1.0 + epoch)

    def peak_weight(self) -> float:
        return self.cfg.weight

    def compute(self, outputs, batch, epoch, seed=0, weight=None) -> TaskOutput:
        clean, flipped = outputs[0], outputs[-1]   # a registered task comes last: its view is the last pass
        logit = self.head(torch.cat([clean.tokens.mean(1), flipped.tokens.mean(1)], dim=1)).float()
        raw = F.binary_cross_entropy_with_logits(logit, batch.params["toy_target"])
        w = self.weight(epoch) if weight is None else weight
        return TaskOutput(loss=w * raw, raw=raw.detach(), weight=w, metrics={"logit": logit.mean().detach()})


@pytest.fixture
def toy():
    ToyTask.initial.clear()
    register("toy", ToyTask)
    try:
        yield ToyTask
    finally:
        unregister("toy")


# ------------------------------------------------------------------------------------------------ (1) training
def _toy_cfg(tmp_path: Path, betons, out: Path, *extra: str):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({"tasks": {"toy": {"enabled": True, "weight": 0.7}}}))
    return load_config(recipe, [
        f"data.train={betons['train']}", f"data.test={betons['test']}", "data.dataset=tiny", "data.loader=resident",
        "data.batch_size=8", "data.eval_batch_size=48", "model.depth=1", "model.embed_dim=16", "model.num_heads=2",
        "optim.epochs=2", "optim.warmup_epochs=0", "engine.precision=fp32", "engine.device=cpu",
        "run.progress=false", "run.log_every=1", "run.max_steps=2", f"run.out_dir={out}", *extra])


def _final_module_state(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / "checkpoints" / "step_00000002" / "ds" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    return state["module"]


def test_a_task_registered_from_a_test_trains_on_both_step_paths(toy, tiny_betons, tmp_path):
    from engine.train import train

    torch.set_num_threads(1)   # bitwise comparison: no thread-dependent matmul splits
    runs = {}
    for path, extra in (("plain", ()), ("static", ("engine.graph_step=emulate",))):
        cfg = _toy_cfg(tmp_path, tiny_betons, tmp_path / path, *extra)
        assert cfg.tasks.toy.enabled and cfg.tasks.toy.weight == 0.7
        assert [name for name, _ in enabled(cfg)] == ["toy"]
        summary = train(cfg)
        assert summary["global_step"] == 2
        runs[path] = [r for r in read_metrics(tmp_path / path / "metrics.jsonl") if r["kind"] == "train"]
    plain, static = runs["plain"], runs["static"]
    assert [r["step"] for r in plain] == [r["step"] for r in static] == [1, 2]
    keys = [k for k in plain[0] if k not in ("time", "kind", "steps_averaged")]
    assert {"loss", "cls_loss", "toy_loss", "toy_logit", "toy_weight"} <= set(keys), keys
    for a, b in zip(plain, static):
        assert all(torch.isfinite(torch.tensor(a[k])) for k in ("loss", "toy_loss"))
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]   # bitwise: tolerance 0
    assert plain[0]["toy_weight"] == pytest.approx(0.7)

    assert len(toy.initial) == 2   # one head per run, built from the same seed
    for before in toy.initial:
        assert torch.equal(before["head.weight"], toy.initial[0]["head.weight"])
    finals = {path: _final_module_state(tmp_path / path) for path in runs}
    head = "tasks.0.head.weight"
    assert not torch.equal(finals["plain"][head], toy.initial[0]["head.weight"])   # the toy head trained
    assert torch.equal(finals["plain"][head], finals["static"][head])
    assert torch.equal(finals["plain"]["tasks.0.head.bias"], finals["static"]["tasks.0.head.bias"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing a CUDA graph needs a CUDA device")
def test_the_toy_task_trains_in_a_captured_graph_on_cuda(toy, tiny_betons, tmp_path):
    """On CUDA: engine.graph_step=on (3 warm-up steps, capture, replays) gives the emulated static step's losses
    with the toy task alone (its weight changes every step: the replays read it from the weights buffer)."""
    from engine.train import train

    losses = {}
    for mode in ("on", "emulate"):
        cfg = _toy_cfg(tmp_path, tiny_betons, tmp_path / mode, "engine.device=cuda", "model.drop_path=0.0",
                       "run.max_steps=8", f"engine.graph_step={mode}")
        train(cfg)
        losses[mode] = [r["loss"] for r in read_metrics(tmp_path / mode / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses["on"]) == len(losses["emulate"]) == 8
    torch.testing.assert_close(torch.tensor(losses["on"]), torch.tensor(losses["emulate"]), rtol=1e-4, atol=1e-5)


def test_the_toy_batch_transform_runs_in_the_loader(toy, tiny_betons, tmp_path):
    """The pipeline calls the toy's transform generically: its view is in Batch.views, its target in params."""
    from engine.tasks import batch_transforms
    from loaders.factory import build_loader

    cfg = _toy_cfg(tmp_path, tiny_betons, tmp_path / "run")
    loader, _ = build_loader(cfg.data, True, 0, torch.device("cpu"), batch_transforms=batch_transforms(cfg))
    batch = next(iter(loader.epoch(0)))
    assert set(batch.views) == {VIEW}
    assert torch.equal(batch.views[VIEW], batch.images.flip(-1))
    assert batch.params["toy_target"].shape == (len(batch), 1)


# -------------------------------------------------------------------------------------------------- (2) schema
def test_the_schema_has_the_toy_keys_only_while_registered(toy):
    keys = {row[0] for row in describe_options()}
    assert {"tasks.toy.enabled", "tasks.toy.weight"} <= keys
    assert list(registered()) == [*BUILTIN, "toy"]
    cfg = config_from_dict({}, ["tasks.toy.enabled=true"])
    assert cfg.tasks.toy.enabled and not cfg.tasks.drloc.enabled
    with pytest.raises(ConfigError, match=r"tasks\.toy\.weight: must be >= 0"):
        config_from_dict({}, ["tasks.toy.weight=-1"])
    unregister("toy")
    try:
        keys = {row[0] for row in describe_options()}
        assert not any(k.startswith("tasks.toy.") for k in keys)
        assert {"tasks.drloc.enabled", "tasks.perceptibility.enabled"} <= keys
        with pytest.raises(ConfigError, match=r"tasks\.toy"):
            config_from_dict({}, ["tasks.toy.enabled=true"])
    finally:
        register("toy", ToyTask)


def test_pretraining_refuses_any_enabled_task(toy):
    from engine.pretrain import check_config

    cfg = config_from_dict({}, ["tasks.toy.enabled=true", "data.multicrop=true"])
    with pytest.raises(ConfigError, match=r"tasks\.\*: auxiliary tasks belong to the supervised \(fine-tune\) "
                                          r"stage.*tasks\.toy"):
        check_config(cfg, 1)


# ---------------------------------------------------------------------------------- (3) who names each task
PATTERNS = {"drloc": r"drloc", "perceptibility": r"perceptib"}
KERNELS = {"kernels/__init__.py", "kernels/counter_hash_triton.py", "kernels/dispatch.py", "kernels/drloc_head.py",
           "kernels/drloc_reference.py", "kernels/drloc_triton.py", "kernels/triton_runtime.py"}
ALLOWED = {
    "drloc": {"engine/tasks/drloc.py", "engine/tasks/registry.py", *KERNELS,
              "bench/heads.py",         # the drloc head's benchmark (its kernels)
              "bench/__main__.py",      # the line that describes that benchmark
              "bench/train.py",         # the full training step of the recipe with both tasks, and the reference's
              "bench/gpu_check.py"},    # runs the drloc kernel tests, the heads bench and the drloc recipe on a GPU
    "perceptibility": {"engine/tasks/perceptibility.py", "loaders/transforms/perceptibility.py",
                       "engine/tasks/registry.py",
                       "bench/loaders.py",  # the data path's benchmark includes the translation transform
                       "bench/train.py"},   # the full training step of the recipe with both tasks
}


def _files_naming(pattern: str) -> set[str]:
    """Source files (.py, .sh) of engine/, loaders/, bench/ and kernels/ whose text matches `pattern` (any case).
    Recipes (.yaml) and recorded results (bench/results/) are data, not code that names a task."""
    found = set()
    for package in ("engine", "loaders", "bench", "kernels"):
        for path in sorted((ROOT / package).rglob("*")):
            if path.suffix not in (".py", ".sh") or "results" in path.relative_to(ROOT).parts:
                continue
            if re.search(pattern, path.read_text(), flags=re.IGNORECASE):
                found.add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("task", sorted(PATTERNS))
def test_files_that_name_each_task_stay_within_the_allowed_set(task):
    found = _files_naming(PATTERNS[task])
    outside = sorted(found - ALLOWED[task])
    core = sorted(f for f in found if f.startswith(("engine/", "loaders/")))
    print(f"{task}: {len(found)} files name it; in engine/ and loaders/: {len(core)} ({', '.join(core)}); "
          f"outside the allowed set: {len(outside)}")
    assert not outside, f"{task} is named outside its own modules and the registry: {outside}"
    for trainer in ("engine/train.py", "engine/train_module.py", "engine/graphed_step.py", "engine/config.py",
                    "engine/supervised_step.py", "engine/pretrain.py", "loaders/factory.py",
                    "loaders/transforms/pipeline.py", "loaders/batch.py"):
        assert trainer not in found


# --------------------------------------------------------------------------------------- (4) a light config
def test_config_imports_without_the_task_modules():
    code = ("import sys, engine.config; "
            "print(sorted(m for m in ('torch', 'engine.tasks.drloc', 'engine.tasks.perceptibility') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
