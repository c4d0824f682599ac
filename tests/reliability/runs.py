"""The small training runs the reliability tests compare: one config, subprocess and in-process helpers, readers.

Every compared run uses the same tiny setup so that one uninterrupted reference serves several tests: the 96/48
random 32x32 images of the `tiny_betons` fixture (4 classes), a global batch of 8 (12 steps per epoch), a 2-block
ViT of width 32 (about 21k parameters), crop + flip augmentation, fp32, deterministic algorithms, drop-path off, and
one thread (bitwise comparisons must not depend on how a matmul is split over threads).
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from conftest import subprocess_env  # noqa: E402

BATCH = 8
TRAIN_IMAGES = 96
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH


def overrides(betons: dict, out: Path, *extra: str, drloc: bool = True) -> list[str]:
    """key=value overrides of the shared tiny run; `extra` comes last and wins."""
    base = [f"data.train={betons['train']}", f"data.test={betons['test']}", "data.dataset=tiny",
            "data.loader=resident", f"data.batch_size={BATCH}", "data.eval_batch_size=48",
            "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.drop_path=0.0",
            "optim.epochs=9", "optim.warmup_epochs=1", "engine.precision=fp32", "engine.deterministic=true",
            "run.progress=false", "run.log_every=1", f"run.out_dir={out}",
            "run.keep_last=0"]   # the tests compare and resume from earlier checkpoints of a run
    if drloc:   # drloc draws pairs from the step seed: the per-step task RNG is part of what resume must restore
        base += ["tasks.drloc.enabled=true", "tasks.drloc.hidden=32", "tasks.drloc.pairs=8"]
    return base + list(extra)


def env(**extra: str) -> dict[str, str]:
    e = subprocess_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    return e


def train_cmd(betons: dict, out: Path, *extra: str, drloc: bool = True) -> list[str]:
    """`smallvit train` on one process, through the traced entry point (see traced_train.py)."""
    return [sys.executable, str(REPO / "tests" / "reliability" / "traced_train.py"),
            *overrides(betons, out, *extra, drloc=drloc)]


def run(cmd: list[str], timeout: float = 600, expect: int = 0) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == expect, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def records(out: Path, kind: str = "train") -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if r.get("kind") == kind]


def losses(out: Path) -> dict[int, float]:
    """step -> logged loss; a step logged twice (before a kill and after the resume) keeps the last."""
    return {r["step"]: r["loss"] for r in records(out)}


def trace(out: Path, rank: int = 0) -> dict[int, dict]:
    """step -> the trace record of `rank` (see traced_train.py); a redone step keeps the last."""
    path = out / "trace" / f"rank{rank}.jsonl"
    return {r["step"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def latest(out: Path) -> Path:
    root = out / "checkpoints"
    return root / (root / "latest").read_text().strip()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs between {a} and {b}"


def assert_equal_losses(got: dict[int, float], expected: dict[int, float], steps) -> None:
    """Bitwise: the logged floats round-trip through JSON exactly."""
    steps = list(steps)
    missing = [s for s in steps if s not in got]
    assert not missing, f"steps {missing[:5]}... were not logged"
    diff = [(s, got[s], expected[s]) for s in steps if got[s] != expected[s]]
    assert not diff, f"{len(diff)} of {len(steps)} losses differ, first: {diff[:3]}"


@contextlib.contextmanager
def one_thread():
    """In-process runs compared bitwise use one intra-op thread, like the subprocess runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_in_process(betons: dict, out: Path, *extra: str, drloc: bool = True, record: bool = True) -> dict:
    """engine.train.train on this process with the shared tiny config; traced like traced_train.py."""
    from engine.config import config_from_dict
    from engine.train import train

    import traced_train

    with one_thread(), (traced_train.tracing(out) if record else contextlib.nullcontext()):
        return train(config_from_dict({}, overrides(betons, out, *extra, drloc=drloc)))


def differences(a, b, path: str = "") -> list[str]:
    """Where two nested states (dicts, lists, tensors, numbers, objects with __dict__) differ; tensors bitwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [path or "<root>"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if hasattr(a, "__dict__") and type(a) is type(b) and not isinstance(a, type):
        return differences(vars(a), vars(b), f"{path}<{type(a).__name__}>")
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]
