"""Whole-process faults on one rank: kill -9, SIGTERM, repeated kills inside an epoch, and the golden-loss gate.

One uninterrupted 100-step run (module fixture, `runs.py` setup, drloc on) is the reference for all four items.
Where a test picks "a random step" it draws it from a generator seeded by RELIABILITY_SEED (default: the time),
and prints the seed and the step in every assertion message so a failure can be replayed.
"""
import os
import random

import pytest
import torch

import faults
import runs
from cpu_fingerprint import check_golden, load_recordings
from runs import REPO, STEPS_PER_EPOCH

FIXTURES = REPO / "tests" / "reliability" / "fixtures"
SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
rng = random.Random(SEED)


@pytest.fixture(scope="module")
def reference(tiny_betons, tmp_path_factory):
    """The uninterrupted run: 100 steps (8 epochs and 4 steps), a checkpoint at every epoch's end and at step 100."""
    out = tmp_path_factory.mktemp("reference") / "run"
    runs.run(runs.train_cmd(tiny_betons, out, "run.max_steps=100"))
    return out


@pytest.fixture(scope="module")
def killed_three_times(tiny_betons, tmp_path_factory):
    """One run to step 72 with a checkpoint every 3 steps, killed (-9) at a random step in each of three windows
    inside epoch 1 (steps 13-24), each time resumed with run.resume=auto; the last resume runs to the end.
    -> (run folder, the steps it was killed at, the step each resume started from)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    cmd = runs.train_cmd(tiny_betons, out, "run.max_steps=72", "run.checkpoint_every_steps=3")
    kills, resumed_from = [], []
    for window in ((16, 17), (19, 20), (22, 23)):   # just after the checkpoints of steps 15, 18 and 21
        kills.append(faults.kill_at_step(cmd + (["run.resume=auto"] if kills else []), out, rng.randint(*window),
                                         runs.env(), REPO))
        resumed_from.append(torch.load(runs.latest(out) / "trainer_state.pt", weights_only=True))
    runs.run(cmd + ["run.resume=auto"])
    return out, kills, resumed_from


def test_item01_kill_9_then_resume_is_bitwise_identical(reference, killed_three_times):
    """Item 1: kill -9 at a random step of a small run, resume: every logged loss after the resume (at least the
    next 50) equals the uninterrupted run's bitwise, and the parameters at the end (step 72) are identical.

    The kill is the last of item 4's three (a random step of 22-23); the resume starts from the mid-epoch
    checkpoint before it (step 21) and replays 51 steps."""
    out, kills, resumed_from = killed_three_times
    why = f"(RELIABILITY_SEED={SEED}, killed at step {kills[-1]})"
    start = resumed_from[-1]["global_step"]
    assert start <= kills[-1] and 72 - start >= 50, why
    runs.assert_equal_losses(runs.losses(out), runs.losses(reference), range(start + 1, 73))
    runs.assert_same_weights(runs.latest(out), reference / "checkpoints" / "step_00000072")


def test_item04_three_kills_inside_one_epoch(reference, killed_three_times):
    """Item 4: three kill -9 / resume cycles inside one epoch (epoch 1; each resume starts mid-epoch from the
    loader position of a step checkpoint): the parameters at the epoch's end (step 24) are identical to the
    uninterrupted run's, and so is every logged loss of the run."""
    out, kills, resumed_from = killed_three_times
    why = f"(RELIABILITY_SEED={SEED}, kills at steps {kills})"
    for state, kill in zip(resumed_from, kills):
        assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < STEPS_PER_EPOCH, why
        assert kill - 3 < state["global_step"] <= kill, why
    runs.assert_equal_losses(runs.losses(out), runs.losses(reference), range(1, 73))
    runs.assert_same_weights(out / "checkpoints" / "step_00000024", reference / "checkpoints" / "step_00000024")


def test_item15_golden_losses(reference):
    """Item 15: 100 deterministic CPU steps of the tiny model (fp32, one thread, deterministic algorithms)
    reproduce the committed tests/reliability/fixtures/golden_losses.json: bitwise on a CPU whose fingerprint
    has a recording there, within cpu_fingerprint.RTOL on any other CPU (the message names both).

    A change in the model, the loss, the data order or augmentation, the optimizer or the schedule fails this.
    Regenerate (tests/reliability/fixtures/make_fixtures.py golden) only for an intended numerical change, and say
    so in the commit; `make_fixtures.py record` adds a new machine's exact values."""
    recordings = load_recordings(FIXTURES / "golden_losses.json")
    assert all(sorted(r["values"]) == list(range(1, 101)) for r in recordings.values())
    check_golden(runs.losses(reference), recordings, range(1, 101), "golden losses")


def test_item17_sigterm_checkpoints_at_the_next_step_and_resumes(tiny_betons, reference, tmp_path):
    """Item 17: SIGTERM in a random step (delivered mid-step, after the forward): the run finishes that step,
    writes a checkpoint at its boundary (`latest` names it), exits with the distinct code 143, and the resume
    satisfies item 1 (every later loss and the final parameters bitwise equal to the uninterrupted run's)."""
    from engine.loop import EXIT_INTERRUPTED

    out = tmp_path / "run"
    cmd = runs.train_cmd(tiny_betons, out, "run.max_steps=72")
    target = rng.randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 2)
    proc = faults.term_at_step(cmd, target, runs.env(), REPO)
    why = f"(RELIABILITY_SEED={SEED}, SIGTERM in step {target})"
    assert proc.returncode == EXIT_INTERRUPTED == 143, proc.stderr[-2000:] + why
    assert max(runs.losses(out)) == target, why          # the step in flight finished, and no further one ran
    assert runs.latest(out).name == f"step_{target:08d}", why
    runs.run(cmd + ["run.resume=auto"])
    runs.assert_equal_losses(runs.losses(out), runs.losses(reference), range(1, 73))
    runs.assert_same_weights(runs.latest(out), reference / "checkpoints" / "step_00000072")
