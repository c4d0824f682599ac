"""Shared fixtures: small real datasets converted once per session, and the shared-data locations."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR10_JPG = SHARED_DATA / "cifar10-jpg.tar.gz"

os.environ.setdefault("OMP_NUM_THREADS", "2")

# One ninja for every process of the suite: DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH,
# and ninja 1.11 (apt) and 1.13 (the venv's) hash build commands differently, so processes that found different
# ninjas rebuilt the op (~1.5 min) in turn instead of reusing the cached build. The venv's comes first for all.
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = f"{_VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"

# In-process training tests join a one-rank process group and so set these; a child process that inherited them
# would take them for a launcher's and try to rendezvous on the same port.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
            "CROSS_SIZE")


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ without the process-group variables, plus `extra`, for tests that start smallvit processes."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def digits_betons(tmp_path_factory) -> dict[str, Path]:
    """The embedded digits set (1,437 train / 360 test, 32x32 RGB) as .beton files with sidecars."""
    from loaders.convert.digits import digits_source
    from loaders.convert.writer import WriteOptions, write_beton

    folder = tmp_path_factory.mktemp("digits")
    out = {}
    for split in ("train", "test"):
        out[split] = folder / f"{split}.beton"
        write_beton(digits_source(split), out[split], WriteOptions(num_workers=2, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_betons(tmp_path_factory) -> dict[str, Path]:
    """A 96/48-image random 32x32 set with 4 classes (labels cycle), for quick loop tests."""
    return write_tiny_betons(tmp_path_factory.mktemp("tiny"))


def write_tiny_betons(folder: Path) -> dict[str, Path]:
    """The `tiny_betons` set written into `folder` (also used by tests/reliability/fixtures/make_fixtures.py)."""
    from loaders.convert.digits import ArraySource
    from loaders.convert.writer import WriteOptions, write_beton

    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 96), ("test", 48)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = np.arange(n) % 4
        out[split] = folder / f"{split}.beton"
        write_beton(ArraySource(images, labels, list("abcd"), "tiny", split), out[split],
                    WriteOptions(num_workers=1, progress=False))
    return out
