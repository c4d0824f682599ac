"""The install: requirements-cpu.lock pins every package and is complete (make setup installs it with --no-deps),
ffcv comes without the GUI OpenCV, the compilers are in the apt list, and Fashion-MNIST is installed for the tests
only."""
from __future__ import annotations

import re
import subprocess
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
NODEPS_EXCEPTIONS = {("ffcv", "opencv-python")}   # requirements-nodeps.txt says why


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-!]+)", line)
            assert m, f"{path.name}: not an exact pin: {line!r}"
            name = canonicalize_name(m.group(1))
            assert name not in pins, f"{path.name}: {name} pinned twice"
            pins[name] = m.group(2)
    return pins


def _requirements(path: Path) -> list[Requirement]:
    return [Requirement(l) for l in (l.strip() for l in path.read_text().splitlines()) if l and not l.startswith("#")]


def test_the_lock_pins_every_requirement_and_leaves_the_gui_opencv_out():
    lock = _pins(REPO / "requirements-cpu.lock")
    for req_file in ("requirements-cpu.txt", "requirements-nodeps.txt"):
        for req in _requirements(REPO / req_file):
            name = canonicalize_name(req.name)
            assert name in lock, f"{req_file}: {req} is not in the lock (run make lock)"
            assert req.specifier.contains(lock[name], prereleases=True), f"{req_file}: {req} vs lock {lock[name]}"
    assert "opencv-python" not in lock and "opencv-python-headless" in lock and "ffcv" in lock
    assert {"pip", "setuptools", "wheel"} <= set(lock)


def test_the_lock_is_closed_and_is_what_is_installed():
    """Every requirement of every locked package is locked too (so --no-deps installs a working set), and this
    environment holds the lock's versions (what make setup installed)."""
    lock = _pins(REPO / "requirements-cpu.lock")
    for name, version in lock.items():
        assert metadata.version(name) == version, f"{name}: {metadata.version(name)} installed, {version} locked"
        for text in metadata.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if (name, dep) in NODEPS_EXCEPTIONS:
                continue
            assert dep in lock, f"{name} needs {req}, which the lock lacks"
            assert req.specifier.contains(lock[dep], prereleases=True), f"{name} needs {req}; locked {lock[dep]}"


def _dry_make(target: str) -> str:
    """What `make TARGET` would run, with the stamp out of date (-W: as on a fresh machine); nothing is run."""
    return subprocess.run(["make", "-n", "-W", "requirements-cpu.lock", target], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=60).stdout


def test_setup_installs_the_lock_with_the_compilers_and_only_the_tests_get_fashion_mnist():
    demo, test = _dry_make("demo"), _dry_make("test")
    for packages in (demo, test):
        assert "build-essential" in packages and "python3-dev" in packages
        assert "pip install -q --no-deps -r requirements-cpu.lock" in packages
        assert "requirements-cpu.txt" not in packages
    assert "dataset-fashion-mnist" not in demo
    assert "dataset-fashion-mnist" in test
