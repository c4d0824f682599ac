"""Checkpoint files under faults: a crash mid-save, a full disk, an old checkpoint, and what loading trusts."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import faults
import runs
from cpu_fingerprint import check_golden, load_recordings
from runs import REPO

SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
rng = random.Random(SEED)
CHILD = REPO / "tests" / "reliability" / "save_child.py"
FIXTURE = REPO / "tests" / "reliability" / "fixtures" / "checkpoint_v2"


def _complete_checkpoints(out) -> list:
    """Every folder at a final path (step_*), checked complete: our two files load safely, DeepSpeed's exist."""
    from safetensors.torch import load_file

    from engine import checkpoint

    folders = sorted((out / "checkpoints").glob("step_*"))
    for folder in folders:
        state = checkpoint.read_state(folder)
        assert state["global_step"] == int(folder.name.split("_")[1]), folder
        assert load_file(str(folder / "model.safetensors")), folder
        ds_files = list((folder / "ds").glob("*.pt"))
        assert ds_files and all(torch.load(f, weights_only=True) for f in ds_files), folder
    return folders


def _assert_previous_loads(out, step: int) -> None:
    """`latest` names step `step`, and a fresh engine resumes from it with exactly the saved parameters."""
    from safetensors.torch import load_file

    import save_child
    from engine import checkpoint

    checkpoint.remove_stale(out)
    root = out / "checkpoints"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], list(root.iterdir())
    folder = checkpoint.resolve(out, "auto")
    assert folder.name == f"step_{step:08d}"
    engine, _ = save_child.build_engine()
    state = checkpoint.load(engine, folder)
    assert state["global_step"] == step
    saved = load_file(str(folder / "model.safetensors"))
    for name, p in engine.module.model.state_dict().items():
        assert torch.equal(p, saved[name]), name


def test_item05_crash_during_save_keeps_the_previous_checkpoint(tmp_path):
    """Item 5: a crash during a checkpoint save, after a random number of bytes (the process killed by SIGXFSZ
    mid-write) and by SIGKILL at a random moment of a save loop: the previous checkpoint loads (with the saved
    parameters), `latest` never names an incomplete checkpoint, nothing partial is at a final path, and the next
    start removes the leftovers."""
    from engine import checkpoint

    env = runs.env()
    ds_size = 340_000   # about the largest file of a save (DeepSpeed's module + optimizer states)
    for n in (rng.randrange(0, ds_size), rng.randrange(0, 1_000)):
        out = tmp_path / f"fsize{n}"
        res = subprocess.run([sys.executable, str(CHILD), str(out), "fsize", str(n)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        why = f"(RELIABILITY_SEED={SEED}, file size limit {n} bytes)"
        assert res.returncode in (-signal.SIGXFSZ, 0), res.stderr[-2000:] + why
        folders = _complete_checkpoints(out)
        step = 2 if res.returncode == 0 else 1
        assert [f.name for f in folders][-1] == f"step_{step:08d}" == checkpoint.latest_name(out), why
        _assert_previous_loads(out, step)

    out = tmp_path / "loop"
    proc = subprocess.Popen([sys.executable, str(CHILD), str(out), "loop"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:          # DeepSpeed logs to stdout first
            if line.strip() == "ready":
                break
        assert proc.poll() is None, "the save loop exited before it was ready"
        time.sleep(rng.uniform(0.2, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    folders = _complete_checkpoints(out)
    named = checkpoint.latest_name(out)
    assert named == folders[-1].name or (named == folders[-2].name and len(folders) >= 2)
    _assert_previous_loads(out, int(named.split("_")[1]))


@pytest.mark.parametrize("fail_at", [0, 1, 2], ids=["deepspeed-states", "trainer-state", "export"])
def test_item06_disk_full_during_save(tmp_path, fail_at):
    """Item 6: ENOSPC while a checkpoint is written (in DeepSpeed's files, our trainer state or the export):
    a CheckpointError naming the checkpoints folder and the cause, no temporary left, and the previous
    checkpoint intact and still named by `latest`."""
    import save_child
    from engine import checkpoint

    out = tmp_path / "run"
    engine, rt = save_child.build_engine()
    save_child.train_step(engine, 1)
    save_child.save(engine, rt, out, 1)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    save_child.train_step(engine, 2)
    with faults.disk_full(after_bytes=rng.randrange(0, 4096), fail_at=fail_at):
        with pytest.raises(checkpoint.CheckpointError) as info:
            save_child.save(engine, rt, out, 2)
    message = str(info.value)
    assert str(out / "checkpoints") in message and "No space left on device" in message
    assert "latest still names step_00000001" in message
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before                        # nothing added, nothing changed: no temporary either
    _assert_previous_loads(out, 1)


def test_item06_disk_full_stops_training_with_one_line(tiny_betons, tmp_path, capsys, monkeypatch):
    """Item 6 through `smallvit train`: a full disk at the first checkpoint is one error line, exit code 1."""
    from engine.config import config_from_dict
    from engine.train import run_training

    import engine.checkpoint as checkpoint_module

    real_save = checkpoint_module.save

    def full_save(*args, **kwargs):
        with faults.disk_full():
            return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save", full_save)
    with runs.one_thread():
        rc = run_training(config_from_dict({}, runs.overrides(tiny_betons, tmp_path / "run", "run.max_steps=1",
                                                              drloc=False)))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("smallvit: error: ") and "No space left on device" in err[-1]
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def test_item14_committed_old_checkpoint_still_resumes(tiny_betons, tmp_path):
    """Item 14: the committed checkpoint (tests/reliability/fixtures/checkpoint_v2, written by an earlier version:
    step 12 of the golden run) resumes: training continues at step 13 and the next 4 losses equal the ones the
    run that wrote it logged (bitwise on a CPU with a recording, to a tight tolerance elsewhere: see
    cpu_fingerprint.py). Update the fixture only with a stated format change (see make_fixtures.py)."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    meta = json.loads(tiny_betons["train"].with_name("train.beton.json").read_text())
    assert meta["source"]["sha256"] == expected["data_sha256"], "tiny_betons' images changed: regenerate"
    out = tmp_path / "run"
    name = f"step_{expected['step']:08d}"
    shutil.copytree(FIXTURE / name, out / "checkpoints" / name)
    (out / "checkpoints" / "latest").write_text(name + "\n")
    recordings = load_recordings(FIXTURE / "expected.json")
    continuation = range(expected["step"] + 1, expected["step"] + len(next(iter(recordings.values()))["values"]) + 1)
    last = continuation[-1]
    runs.train_in_process(tiny_betons, out, f"run.max_steps={last}", "run.resume=auto", record=False)
    got = runs.losses(out)
    assert sorted(got) == list(range(expected["step"] + 1, last + 1))
    check_golden(got, recordings, continuation, "losses after resuming the committed checkpoint")


def test_item19_checkpoints_load_without_unpickling_code(tmp_path):
    """Item 19: every file of a checkpoint (ZeRO 0 and ZeRO 1: DeepSpeed's module and optimizer shards, our trainer
    state) loads with torch.load(weights_only=True) (DeepSpeed's ZeRO shards with its three plain data classes
    allowlisted, checkpoint.safe_globals), and resuming reads them that way; the export loads with safetensors into
    the plain timm VisionTransformer of the same shape with no missing or unexpected keys and gives its logits."""
    import timm
    from safetensors.torch import load_file

    import save_child
    from engine import checkpoint

    for stage in (0, 1):
        out = tmp_path / f"zero{stage}"
        engine, rt = save_child.build_engine(zero_stage=stage)
        save_child.train_step(engine, 1)
        folder = save_child.save(engine, rt, out, 1)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert ("ds/zero_pp_rank_0_mp_rank_00_optim_states.pt" in files) == (stage == 1), files
        allowed = {f"{c.__module__}.{c.__qualname__}" for c in checkpoint.safe_globals()}
        for name in files:
            if name.endswith(".pt"):
                assert set(torch.serialization.get_unsafe_globals_in_checkpoint(folder / name)) <= allowed
                with torch.serialization.safe_globals(checkpoint.safe_globals()):
                    torch.load(folder / name, map_location="cpu", weights_only=True)
            else:   # DeepSpeed copies its ZeRO conversion scripts beside the shards; nothing here runs them
                assert name == checkpoint.EXPORT_FILE or name.endswith(".py"), name
        fresh, _ = save_child.build_engine(zero_stage=stage)
        checkpoint.load(fresh, folder)             # the resume path itself reads with weights_only=True
        assert not runs.differences(fresh.module.state_dict(), engine.module.state_dict())
        plain = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
            num_classes=4)
        result = plain.load_state_dict(load_file(str(folder / checkpoint.EXPORT_FILE)), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        x = torch.randn(2, 3, 32, 32)
        engine.module.model.eval()
        plain.eval()
        with torch.no_grad():
            assert torch.allclose(plain(x), engine.module.model(x), atol=1e-6)
