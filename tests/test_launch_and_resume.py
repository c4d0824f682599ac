"""Whole-process behaviour of training on the CPU accelerator: the `deepspeed` launcher with 2 ranks and with 2
"nodes" (--no_ssh on localhost), ZeRO 1 and 2, kill -9 and SIGTERM followed by resume.

Small data (96 train / 48 test random 32x32 images, 4 classes), fp32, drop-path off, drloc off where ranks are
compared (its pair sampling draws per rank), so runs are comparable step by step.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 96 // 16


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(betons, out, *extra):
    return [f"data.train={betons['train']}", f"data.test={betons['test']}", "data.dataset=tiny",
            "data.loader=resident", "data.batch_size=16", "data.eval_batch_size=48", "model.drop_path=0.0",
            "optim.epochs=3", "optim.warmup_epochs=0", "engine.precision=fp32", "run.progress=false",
            "run.log_every=1", f"run.out_dir={out}", *extra]


def _env():
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _train_cmd(betons, out, *extra):
    return [sys.executable, "-m", "engine.cli", "train", *_overrides(betons, out, *extra)]


def _losses(out: Path) -> dict[int, float]:
    """step -> logged mean loss; a step logged twice (before a kill and after the resume) keeps the last."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            losses[r["step"]] = r["loss"]
    return losses


def _run(cmd, timeout=600):
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def reference_run(tiny_betons, tmp_path_factory):
    """An uninterrupted 3-epoch single-process run (drloc on) that interrupted runs are compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_train_cmd(tiny_betons, out, "tasks.drloc.enabled=true"))
    return out


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before the step the test waits for"
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines()
                                     if l.strip()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_matches_uninterrupted(tiny_betons, reference_run, tmp_path):
    """kill -9 in epoch 1 (after epoch 0's checkpoint); resume=auto redoes epoch 1 from that checkpoint and every
    logged loss from there on equals the uninterrupted run's."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny_betons, out, "tasks.drloc.enabled=true"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(out, STEPS_PER_EPOCH + 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS_PER_EPOCH:08d}"
    _run(_train_cmd(tiny_betons, out, "tasks.drloc.enabled=true", "run.resume=auto"))
    expected, got = _losses(reference_run), _losses(out)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


@pytest.mark.slow
def test_sigterm_checkpoints_at_next_step_and_resumes(tiny_betons, reference_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny_betons, out, "tasks.drloc.enabled=true"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, STEPS_PER_EPOCH + 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    stopped_at = max(_losses(out))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    assert STEPS_PER_EPOCH < stopped_at < 3 * STEPS_PER_EPOCH
    _run(_train_cmd(tiny_betons, out, "tasks.drloc.enabled=true", "run.resume=auto"))
    expected, got = _losses(reference_run), _losses(out)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_train_and_resume(tiny_betons, tmp_path, stage):
    """ZeRO 1 and 2 (one rank): the loss falls over 3 epochs of the same 96 images and a checkpoint resumes."""
    from engine.train import train
    from engine.config import config_from_dict

    out = tmp_path / "run"
    summary = train(config_from_dict({}, _overrides(tiny_betons, out, f"engine.zero_stage={stage}",
                                                     "optim.lr=3e-3")))
    losses = _losses(out)
    first, last = [losses[s] for s in range(1, 7)], [losses[s] for s in range(13, 19)]
    assert sum(last) < sum(first), (first, last)
    assert summary["global_step"] == 18
    more = train(config_from_dict({}, _overrides(tiny_betons, out, f"engine.zero_stage={stage}", "optim.lr=3e-3",
                                                  "optim.epochs=4", "run.resume=auto")))
    assert more["global_step"] == 24


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_through_the_launcher_match_one_rank(tiny_betons, tmp_path):
    """`deepspeed --num_gpus 2` (gloo, 2 local ranks, 8 images each) logs the same per-step mean losses and test
    accuracy as one process with the same global batch of 16."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_train_cmd(tiny_betons, one))
    _run(["deepspeed", "--num_gpus", "2", "--master_port", str(_port()), "engine/train.py",
          *_overrides(tiny_betons, two)])
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    sa = json.loads((one / "summary.json").read_text())
    sb = json.loads((two / "summary.json").read_text())
    assert sb["last"]["count"] == sa["last"]["count"] == 48
    assert sb["last"]["top1"] == pytest.approx(sa["last"]["top1"], abs=100 / 48 + 1e-9)


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_nodes_no_ssh_on_localhost(tiny_betons, tmp_path):
    """Two launcher processes, node ranks 0 and 1 of a 2-host hostfile, --no_ssh: one job of world size 2."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "run"
    port = _port()
    procs = [subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                               "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1",
                               "--master_port", str(port), "engine/train.py",
                               *_overrides(tiny_betons, out, "optim.epochs=1")],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-2000:] for l in logs)
    env = json.loads((out / "environment.json").read_text())
    assert env["world_size"] == 2
    assert sorted(_losses(out)) == list(range(1, STEPS_PER_EPOCH + 1))
