"""Fault injection for the reliability tests: kill a training process at step k (SIGKILL from inside the traced
run, exact) or signal it once the log reaches step k (from outside), crash a writer after n bytes, make writes fail
with ENOSPC.

A truly full filesystem needs a mount (root); the disk-full case is therefore a patched writer that writes part of
its bytes and then raises OSError(ENOSPC), which is what a full disk does to `write(2)`. The crash after n bytes is
a real kernel-level crash: RLIMIT_FSIZE makes the first write that would grow any file past n bytes kill the process
with SIGXFSZ, in the middle of whatever it was writing, with no Python cleanup running.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import resource
import signal
import subprocess
import time
from pathlib import Path

import torch


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:   # a line being written right now
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return steps


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Block until metrics.jsonl logs a training step >= `step`; return the highest step logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = logged_steps(out)
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before step {step}: "
                                 f"{_tail(proc)}")
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def _tail(proc: subprocess.Popen) -> str:
    try:
        return (proc.stderr.read() or "")[-2000:] if proc.stderr else ""
    except (OSError, ValueError):
        return ""


def signal_at_step(cmd: list[str], out: Path, step: int, sig: int, env: dict, cwd: Path,
                   timeout: float = 300) -> tuple[subprocess.Popen, int]:
    """Start `cmd`, send `sig` once metrics.jsonl logs step >= `step`, wait for the exit.
    -> (the finished process, the highest step logged when the signal was sent)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = wait_for_step(out, step, proc, timeout)
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, seen


def _signalled_in_step(cmd: list[str], variable: str, step: int, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env={**env, variable: str(step)}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=600)


def kill_at_step(cmd: list[str], out: Path, step: int, env: dict, cwd: Path) -> int:
    """Run a traced training command (tests/reliability/traced_train.py) that gets SIGKILL in step `step`, after
    its forward and before its optimizer step; return `step`. The log holds steps up to step - 1."""
    proc = _signalled_in_step(cmd, "RELIABILITY_KILL_AT_STEP", step, env, cwd)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert max(logged_steps(out)) == step - 1, (step, max(logged_steps(out), default=None))
    return step


def term_at_step(cmd: list[str], step: int, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """Run a traced training command that gets SIGTERM in step `step` (after its forward); the finished process."""
    return _signalled_in_step(cmd, "RELIABILITY_TERM_AT_STEP", step, env, cwd)


def limit_file_size(n: int) -> None:
    """From now on this process dies (SIGXFSZ, no cleanup) at the first write that grows any file past n bytes."""
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


@contextlib.contextmanager
def disk_full(after_bytes: int = 0, fail_at: int = 0):
    """The `fail_at`-th file (0-based) that torch.save or safetensors writes from now on gets `after_bytes` bytes,
    then OSError(ENOSPC), as on a full disk; the files before it are written whole. (Both write through C++, so
    the patch is at their Python entry points; the partial file stays behind, as a real short write leaves it.)"""
    import safetensors.torch as st

    real_save, real_save_file = torch.save, st.save_file
    count = {"n": 0}

    def short_write(path, data: bytes) -> None:
        count["n"] += 1
        if count["n"] - 1 < fail_at:
            with open(path, "wb") as fh:
                fh.write(data)
            return
        with open(path, "wb") as fh:
            fh.write(data[:after_bytes])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        if not isinstance(f, (str, Path)):
            return real_save(obj, f, *args, **kwargs)
        short_write(f, buf.getvalue())

    def save_file(tensors, filename, metadata=None):
        short_write(filename, st.save(tensors, metadata=metadata))

    torch.save, st.save_file = save, save_file
    try:
        yield
    finally:
        torch.save, st.save_file = real_save, real_save_file


class InfGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite); an Inf gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def inject_nonfinite(monkeypatch, nan_step=None, inf_step=None, at_step=None) -> None:
    """In engine.train's loop, make the class loss NaN at global step `nan_step` and its gradient Inf at `inf_step`
    (1-based, as logged). `at_step(step)`, if given, is called at the start of every step (1-based)."""
    import engine.train as train_module
    import engine.train_module as module_of_train   # where TrainModule looks class_ce up

    current = {"step": 0}
    real_ce, real_seed = module_of_train.class_ce, train_module.step_seed

    def step_seed(seed, global_step, rank):
        current["step"] = global_step + 1
        if at_step is not None:
            at_step(current["step"])
        return real_seed(seed, global_step, rank)

    def class_ce(*args, **kwargs):
        out = real_ce(*args, **kwargs)
        if current["step"] == nan_step:
            return out * float("nan")
        if current["step"] == inf_step:
            return InfGradient.apply(out)
        return out

    monkeypatch.setattr(train_module, "step_seed", step_seed)
    monkeypatch.setattr(module_of_train, "class_ce", class_ce)
