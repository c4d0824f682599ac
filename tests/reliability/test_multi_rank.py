"""Several ranks on the CPU (gloo) through the `deepspeed` launcher: resume, world-size change, the launcher itself.

drloc is off here: its pair sampling draws per rank, so runs on different world sizes would not be comparable.
Every rank writes its own trace (traced_train.py): per-rank losses and the sample indices each rank read.
"""
import os
import random
import shutil
import socket
import subprocess

import numpy as np
import pytest

import runs
from runs import REPO, STEPS_PER_EPOCH, TRAIN_IMAGES

SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
rng = random.Random(SEED)
STOP = rng.randint(2, STEPS_PER_EPOCH - 3)      # the mid-epoch stop of the interrupted 2-rank run
END = 2 * STEPS_PER_EPOCH
pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(betons, out, *extra):
    """The traced run on 2 ranks through `deepspeed --num_gpus 2` (gloo on the CPU)."""
    return runs.run(["deepspeed", "--num_gpus", "2", "--master_port", str(_port()),
                     str(REPO / "tests" / "reliability" / "traced_train.py"),
                     *runs.overrides(betons, out, *extra, drloc=False)])


@pytest.fixture(scope="module")
def two_ranks(tiny_betons, tmp_path_factory):
    """(uninterrupted 2-rank run of 2 epochs, a 2-rank run stopped at step STOP and resumed on 2 ranks)."""
    root = tmp_path_factory.mktemp("ranks")
    ref, part = root / "ref", root / "part"
    _launch(tiny_betons, ref, f"run.max_steps={END}")
    _launch(tiny_betons, part, f"run.max_steps={STOP}")
    shutil.copytree(part, root / "stopped")         # kept for the world-size change of item 16
    _launch(tiny_betons, part, f"run.max_steps={END}", "run.resume=auto")
    return ref, part, root / "stopped"


def test_item03_two_ranks_resume_per_rank_and_each_sample_once(two_ranks):
    """Item 3: two ranks (gloo) stopped mid-epoch and resumed: each rank's own loss at every step after the resume
    equals the uninterrupted run's bitwise; in every epoch the union of the indices over ranks is the dataset
    exactly once (96 = 12 x 8). drop_last semantics, asserted on the plan: with N not a multiple of the global
    batch, floor(N / G) steps run, each sample is seen at most once and the N mod G left out differ by epoch."""
    ref, part, _ = two_ranks
    why = f"(RELIABILITY_SEED={SEED}, stopped after step {STOP})"
    for rank in (0, 1):
        a, b = runs.trace(ref, rank), runs.trace(part, rank)
        assert sorted(a) == sorted(b) == list(range(1, END + 1)), why
        diff = [s for s in range(STOP + 1, END + 1) if (a[s]["loss"], a[s]["index"]) != (b[s]["loss"], b[s]["index"])]
        assert not diff, f"rank {rank} differs at steps {diff} {why}"
    for out in (ref, part):
        t0, t1 = runs.trace(out, 0), runs.trace(out, 1)
        for epoch in range(END // STEPS_PER_EPOCH):
            steps = range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
            seen = [i for s in steps for i in t0[s]["index"] + t1[s]["index"]]
            assert sorted(seen) == list(range(TRAIN_IMAGES)), (out.name, epoch, why)
            assert all(not set(t0[s]["index"]) & set(t1[s]["index"]) for s in steps)

    from loaders.order import EpochPlan

    plan = EpochPlan(num_samples=100, global_batch=8, seed=3)
    assert plan.steps() == 12
    dropped = []
    for epoch in range(3):
        union = np.concatenate([plan.rank_order(epoch, r, 2) for r in range(2)])
        assert len(union) == 96 and len(set(union.tolist())) == 96
        dropped.append(set(range(100)) - set(union.tolist()))
    assert len({frozenset(d) for d in dropped}) > 1


def test_item16_world_size_change_mid_epoch(tiny_betons, two_ranks, tmp_path):
    """Item 16: a 2-rank checkpoint taken mid-epoch resumes on 1 rank, and a 1-rank one on 2 ranks (same global
    batch, ZeRO 0): the first loss after the resume is within 1e-3 relative of the uninterrupted 2-rank run's,
    and every sample of that epoch is still seen exactly once. ZeRO 1/2 checkpoints (optimizer state split per
    rank) are refused on another world size with an error naming the folder."""
    from engine import checkpoint

    ref, _, stopped = two_ranks
    mean_ref = runs.losses(ref)
    why = f"(RELIABILITY_SEED={SEED}, stopped after step {STOP})"

    two_to_one = tmp_path / "two_to_one"
    shutil.copytree(stopped, two_to_one)
    runs.run(runs.train_cmd(tiny_betons, two_to_one, f"run.max_steps={STEPS_PER_EPOCH}", "run.resume=auto",
                            drloc=False))
    first = runs.losses(two_to_one)[STOP + 1]
    assert first == pytest.approx(mean_ref[STOP + 1], rel=1e-3), why
    before = [i for r in (0, 1) for s, t in runs.trace(stopped, r).items() if s <= STOP for i in t["index"]]
    after = [i for s, t in runs.trace(two_to_one, 0).items() if STOP < s <= STEPS_PER_EPOCH for i in t["index"]]
    assert sorted(before + after) == list(range(TRAIN_IMAGES)), why

    one_to_two = tmp_path / "one_to_two"
    runs.run(runs.train_cmd(tiny_betons, one_to_two, f"run.max_steps={STOP}", drloc=False))
    one = runs.losses(one_to_two)
    for s in range(1, STOP + 1):                    # one rank at the same global batch: the same run
        assert one[s] == pytest.approx(mean_ref[s], rel=1e-4), (s, why)
    _launch(tiny_betons, one_to_two, f"run.max_steps={STEPS_PER_EPOCH}", "run.resume=auto")
    assert runs.losses(one_to_two)[STOP + 1] == pytest.approx(mean_ref[STOP + 1], rel=1e-3), why
    t = {r: runs.trace(one_to_two, r) for r in (0, 1)}
    seen = [i for s, rec in t[0].items() if s <= STOP for i in rec["index"]]
    seen += [i for r in (0, 1) for s, rec in t[r].items() if STOP < s <= STEPS_PER_EPOCH for i in rec["index"]]
    assert sorted(seen) == list(range(TRAIN_IMAGES)), why

    folder = runs.latest(stopped)
    with pytest.raises(ValueError, match=f"{folder}.*2 ranks under ZeRO stage 1"):
        checkpoint.check_world_size({"world_size": 2, "zero_stage": 1}, folder, 1)
    checkpoint.check_world_size({"world_size": 2, "zero_stage": 0}, folder, 1)   # stage 0: allowed


def test_item18_launcher_hostfile_and_two_nodes(tiny_betons, tmp_path):
    """Item 18: a malformed hostfile fails before anything starts, with a message naming the bad line; a 2-"node"
    run (two launchers, node ranks 0 and 1 of a 2-host hostfile, --no_ssh on localhost) completes 10 steps as one
    job of world size 2."""
    import json

    bad = tmp_path / "bad_hostfile"
    bad.write_text("localhost slots=1\nworker-1 slots=two\n")
    res = subprocess.run(["deepspeed", "--hostfile", str(bad), "--no_ssh", "--node_rank", "0", "--num_nodes", "2",
                          "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(_port()),
                          str(REPO / "engine" / "train.py")], cwd=REPO, env=runs.env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "bad entry: worker-1 slots=two" in res.stderr + res.stdout

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "run"
    port = _port()
    procs = [subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                               "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1",
                               "--master_port", str(port), "engine/train.py",
                               *runs.overrides(tiny_betons, out, "run.max_steps=10", drloc=False)],
                              cwd=REPO, env=runs.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    assert json.loads((out / "environment.json").read_text())["world_size"] == 2
    assert sorted(runs.losses(out)) == list(range(1, 11))
    assert runs.latest(out).name == "step_00000010"
