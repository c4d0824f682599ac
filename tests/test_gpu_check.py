"""The GPU check (bench/gpu_check.py) and its bundle (bench/gpu_bundle.py): the stage runner goes on past a
failing or overrunning stage and reports it within the 8-file limit; the bundle carries exactly what the GPU image
lacks; and the whole check runs end to end on the CPU (--dry-run) against a freshly built bundle, as CI runs it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_bundle, gpu_check
from bench.gpu_bundle import BundleError, carry_list
from bench.gpu_check import MAX_OUT_FILES, OUT_FILES, STAGES, Context, Outcome, Stage, run_check

from conftest import CIFAR10_JPG, subprocess_env

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the runner
def _context(tmp_path: Path) -> Context:
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    return Context(REPO, out, work, tmp_path / "site", tmp_path / "bundle", True, out / "check.log")


def test_the_check_goes_on_past_failing_and_overrunning_stages_and_reports_them(tmp_path):
    """A stage whose command fails, one that overruns its box (SIGTERM first, so a training run can checkpoint),
    one skipped because what it needs failed: each reported with its reason, the stages after them still run, the
    exit status says so, and OUT holds check.json and check.log only."""
    ctx = _context(tmp_path)
    marker = tmp_path / "got-sigterm"
    slow = ("import signal, sys, time\n"
            f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').write('term'), sys.exit(143)))\n"
            "time.sleep(60)")
    ran = []

    def boom(c):
        ran.append("boom")
        c.py("-c", "import sys; print('the device fell over'); sys.exit(3)")
        return Outcome("ok")

    def overrun(c):
        ran.append("overrun")
        c.py("-c", slow)
        return Outcome("ok")

    def after(c):
        ran.append("after")
        return Outcome("ok", "still ran")

    stages = [Stage("boom", 30, 30, "fails"), Stage("overrun", 3, 3, "sleeps past its box"),
              Stage("needs-boom", 30, 30, "needs boom", needs=("boom",)), Stage("after", 30, 30, "passes")]
    lines = []
    rc, record = run_check(ctx, stages, {"boom": boom, "overrun": overrun, "needs-boom": after, "after": after},
                           echo=lines.append)
    assert rc == 1
    assert ran == ["boom", "overrun", "after"]          # needs-boom never started
    res = record["stages"]
    assert [res[s]["status"] for s in ("boom", "overrun", "needs-boom", "after")] == \
        ["failed", "timeout", "skipped", "ok"]
    assert "exited 3: the device fell over" in res["boom"]["note"]
    assert "needs boom" in res["needs-boom"]["note"]
    assert marker.read_text() == "term"                 # SIGTERM before the box's end, not a bare SIGKILL
    assert res["overrun"]["seconds"] < 3 + 1.5
    on_disk = json.loads((ctx.out / "check.json").read_text())
    assert on_disk["stages"].keys() == res.keys() and on_disk["summary"] == record["summary"]
    summary = lines[-1]
    for name, status in (("boom", "failed"), ("overrun", "timeout"), ("needs-boom", "skipped"), ("after", "ok")):
        assert any(line.startswith(name) and status in line for line in summary.splitlines())
    assert sorted(p.name for p in ctx.out.iterdir()) == ["check.json", "check.log"]
    log = (ctx.out / "check.log").read_text()
    assert "the device fell over" in log and "[stopped: the stage's time box ended" in log


def test_the_check_refuses_to_write_more_files_than_a_device_call_returns(tmp_path):
    ctx = _context(tmp_path)

    def spill(c):
        for i in range(MAX_OUT_FILES):
            (c.out / f"extra{i}.json").write_text("{}")
        return Outcome("ok")

    with pytest.raises(RuntimeError, match=f"more than the {MAX_OUT_FILES} a call returns"):
        run_check(ctx, [Stage("spill", 5, 5, "writes too much")], {"spill": spill}, echo=lambda s: None)


def test_stage_budgets_fit_one_device_call():
    assert MAX_OUT_FILES == 8 and len(OUT_FILES) <= MAX_OUT_FILES
    assert gpu_check.TOTAL_BUDGET_S == sum(s.budget_s for s in STAGES) <= 8 * 60
    assert [s.name for s in STAGES] == list(gpu_check.STAGE_FUNCTIONS)
    assert all(n in {s.name for s in STAGES} for s in STAGES for n in s.needs)


def test_the_check_refuses_bad_arguments(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    assert gpu_check.main([str(full), "--dry-run"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert gpu_check.main([str(tmp_path / "o1"), "--bundle", str(tmp_path / "nothing")]) == 2
    assert "run `make gpu-bundle`" in capsys.readouterr().err
    assert gpu_check.main([str(tmp_path / "o2"), "--stages", "install,warp-drive"]) == 2
    assert "unknown stage(s) warp-drive" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_targets_are_read_from_the_stage_results(tmp_path):
    """The issue's ratios from the bench JSON the stages wrote: met, missed, and absent where a figure is absent."""
    rows = [{"variant": f"{v} b{b}", "batch": b, "images_per_s": ips} for v, b, ips in [
        ("model_only_graphed", 1024, 1000.0), ("ours_graphed (graphed)", 1024, 980.0),
        ("ours_deepspeed_graphed (graphed)", 1024, 960.0), ("model_only_graphed", 512, 1000.0),
        ("ours_deepspeed_graphed (graphed)", 512, 900.0)]]
    (tmp_path / "train.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "full_step.json").write_text(json.dumps({"results": {"no_drloc": {"median_ms": 10.0},
                                                                     "triton": {"median_ms": 10.2}}}))
    (tmp_path / "train_run.json").write_text(json.dumps({"summary": {"images_per_second": 850.0}}))
    got = {t["target"]: (t["value"], t["met"]) for t in gpu_check.evaluate_targets(
        tmp_path, {"cuda-tests": {"figures": {"passed": 40, "failed": 1}}})}
    assert got == {
        "full recipe, DeepSpeed graphed / graphed model only, b512": (0.9, False),
        "full recipe, DeepSpeed graphed / graphed model only, b1024": (0.96, True),
        "DeepSpeed graphed / plain graphed step, b1024": (0.98, True),
        "fused (Triton) drloc head's share of the step": (0.02, True),
        "real run's whole-loop img/s / step bench (DeepSpeed graphed, b1024)": (0.885, False),
        "CUDA equality tests green": (1, False)}
    assert gpu_check.evaluate_targets(tmp_path / "none", {}) == []


def test_the_real_runs_overrides_are_the_recipe_with_valid_keys():
    """Both modes' overrides load over the recipe (a renamed key would stop the GPU run only on the GPU): the GPU's
    run is the ViT + drloc recipe at batch 1024, bf16, graphed; the dry run's a 1-block CPU model."""
    from engine.config import load_config

    recipe = REPO / "configs" / "cifar10_vit_drloc.yaml"
    gpu = load_config(str(recipe), list(gpu_check.REAL_RUN_GPU))
    assert (gpu.data.batch_size, gpu.engine.precision, gpu.engine.graph_step, gpu.tasks.drloc.enabled) == \
        (1024, "bf16", "on", True)
    assert gpu.model.name == "vit_cifar" and gpu.data.auto_augment == "cifar10" and gpu.engine.zero_stage == 0
    import torch

    from engine.graphed_step import config_fallback_reason

    assert config_fallback_reason(gpu, 1, torch.device("cuda"), 50_000) is None   # captured there, not a fallback
    dry = load_config(str(recipe), list(gpu_check.REAL_RUN_DRY))
    assert (dry.model.depth, dry.engine.device, dry.engine.graph_step) == (1, "cpu", "emulate")


# ---------------------------------------------------------------------------------------------- what to carry
def _walk(roots, image, dists):
    return carry_list(roots, image, lambda n: dists[n][1], lambda n: dists[n][0] if n in dists else None)


def test_the_bundle_carries_the_closure_the_image_lacks():
    image = {"torch": "2.11.0", "numpy": None, "opencv-python-headless": None, "typing-extensions": None}
    dists = {"deepspeed": ("0.19.8", ["torch>=2.0", "pydantic>=2", "numpy"]),
             "pydantic": ("2.14.4", ["typing-extensions>=4.16", "pydantic-core==2.50.5"]),
             "pydantic-core": ("2.50.5", ["typing-extensions>=4.14"]),
             "typing-extensions": ("4.16.0", []),
             "ffcv": ("1.0.2", ["opencv-python", "numpy>=1.20"]),
             "tomli": ("2.0", [])}
    roots = ["torch>=2.4", "deepspeed>=0.15", 'ffcv==1.0.2; extra == "ffcv"', 'nvidia-dali-cuda130; extra == "dali"',
             'tomli; python_version < "3.11"']
    carried, unverified = _walk(roots, image, dists)
    assert [(c.name, c.version, c.needed_by) for c in carried] == [
        ("deepspeed", "0.19.8", "smallvit"), ("ffcv", "1.0.2", "smallvit"), ("pydantic", "2.14.4", "deepspeed"),
        ("typing-extensions", "4.16.0", "pydantic"), ("pydantic-core", "2.50.5", "pydantic")]
    assert carried[3].why                               # carried although the image has one: ALWAYS_CARRY says why
    assert unverified == ["ffcv needs numpy>=1.20; the image has numpy (version not recorded)"]


def test_the_bundle_refuses_what_cannot_work_there():
    dists = {"deepspeed": ("0.19.8", ["torch>=2.12"])}
    with pytest.raises(BundleError, match=r"deepspeed needs torch>=2.12, but the GPU image has torch 2.11.0"):
        _walk(["deepspeed"], {"torch": "2.11.0"}, dists)
    with pytest.raises(BundleError, match=r"hjson \(needed by deepspeed\) is not installed here"):
        _walk(["deepspeed"], {}, {"deepspeed": ("0.19.8", ["hjson"])})
    with pytest.raises(BundleError, match=r"smallvit needs deepspeed>=0.20, but deepspeed 0.19.8 is installed"):
        _walk(["deepspeed>=0.20"], {}, {"deepspeed": ("0.19.8", [])})


def test_a_damaged_bundle_file_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.bin").write_bytes(b"0123456789")
    manifest = gpu_bundle.make_manifest(tmp_path, [], [], 0.0)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert gpu_bundle.verify_bundle(tmp_path)["files"]["data/x.bin"]["bytes"] == 10
    (tmp_path / "data" / "x.bin").write_bytes(b"0123456780")
    with pytest.raises(BundleError, match=r"data/x.bin: differs from the manifest"):
        gpu_bundle.verify_bundle(tmp_path)
    assert gpu_bundle.verify_bundle(tmp_path, "wheels/")          # only the part asked for is checked
    with pytest.raises(BundleError, match="run `make gpu-bundle`") as err:
        gpu_bundle.verify_bundle(tmp_path / "elsewhere")
    assert err.value.code == 2


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="session")
def built_bundle(tmp_path_factory) -> Path:
    """`make gpu-bundle`'s build into a temporary folder (PyPI for the wheels, ../shared/data for the data)."""
    if not CIFAR10_JPG.is_file():
        pytest.skip(f"{CIFAR10_JPG} absent: the bundle carries it")
    out = tmp_path_factory.mktemp("bundle") / "gpu-bundle"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_bundle", "build", "--out", str(out)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.slow
def test_the_bundle_holds_what_the_gpu_machine_needs(built_bundle):
    manifest = gpu_bundle.verify_bundle(built_bundle)
    assert manifest["total_bytes"] <= gpu_bundle.SIZE_LIMIT
    names = {p["name"] for p in manifest["packages"]}
    assert {"deepspeed", "ffcv", "pydantic", "pydantic-core", "hjson"} <= names
    assert not names & {"torch", "numpy", "timm", "opencv-python", "opencv-python-headless", "nvidia-dali-cuda130"}
    wheels = {Path(k).name: v for k, v in manifest["files"].items() if k.startswith("wheels/")}
    assert any(n.startswith("pydantic_core-") and "-cp312-" in n and v["for"] == "gpu" for n, v in wheels.items())
    ffcv = [n for n in wheels if n.startswith("ffcv-")]
    assert ffcv == ["ffcv-1.0.2-cp38-abi3-linux_x86_64.whl"]
    import zipfile

    with zipfile.ZipFile(built_bundle / "wheels" / ffcv[0]) as zf:
        libs = {Path(n).name for n in zf.namelist() if n.startswith("ffcv.libs/")}
    assert {"libopencv_core.so.406", "libopencv_imgproc.so.406", "libturbojpeg.so.0"} <= libs
    assert gpu_bundle.sha256(built_bundle / manifest["data"]["file"]) == gpu_bundle.DATA_SHA256


@pytest.mark.slow
def test_the_dry_run_passes_end_to_end_against_the_bundle(built_bundle, tmp_path):
    """What CI runs: every stage on the CPU at tiny sizes, the bundle installed into a temporary target and used
    from there (the probe checks that deepspeed and ffcv resolve from the target), within the 8-file limit."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--bundle", str(built_bundle), str(out)],
                          cwd=REPO, env=subprocess_env(PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=1200)
    record = json.loads((out / "check.json").read_text())
    statuses = {name: (r["status"], r["note"]) for name, r in record["stages"].items()}
    assert proc.returncode == 0, f"{statuses}\n{proc.stdout[-3000:]}\n{(out / 'check.log').read_text()[-6000:]}"
    assert list(statuses) == [s.name for s in STAGES] and all(s == "ok" for s, _ in statuses.values())
    written = sorted(p.name for p in out.iterdir())
    assert set(written) <= set(OUT_FILES) and len(written) <= MAX_OUT_FILES
    assert set(written) == set(OUT_FILES)
    env = record["environment"]
    assert env["packages"]["deepspeed"] == "0.19.8" and env["packages"]["ffcv"] == "1.0.2"
    assert env["source_digest"] == record["source_digest"] and env["bundle"]["source_digest_matches"]
    assert record["stages"]["install"]["figures"]["problems"] == []
    assert statuses["data"][1].startswith("cifar10: 100 train / 100 test")
    assert "skipped" in statuses["cuda-tests"][1]
    train = json.loads((out / "train.json").read_text())["rows"]
    assert [r["variant"] for r in train][-1] == "reference b4"
    run = json.loads((out / "train_run.json").read_text())
    assert run["summary"]["exit_code"] == 0 and len(run["evals"]) == 1 and run["train_loss"]
    summary = proc.stdout[proc.stdout.index("GPU check (dry-run)"):].splitlines()
    assert all(any(l.startswith(f"{s.name} ") and " ok " in l for l in summary) for s in STAGES)


@pytest.mark.slow
def test_a_damaged_bundle_fails_its_stage_and_the_rest_still_run(built_bundle, tmp_path):
    """The data file truncated: the data stage fails naming it, the run that needs the data is skipped, the
    stage between them still runs, and the check exits 1 with its report."""
    bundle = tmp_path / "bundle"
    shutil.copytree(built_bundle, bundle, copy_function=lambda s, d: Path(d).symlink_to(s))
    data = bundle / "data" / "cifar10-jpg.tar.gz"
    data.unlink()
    data.write_bytes(b"not a tarball")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--bundle", str(bundle), "--stages",
                           "data,cuda-tests,real-run", str(out)], cwd=REPO, env=subprocess_env(PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    record = json.loads((out / "check.json").read_text())["stages"]
    assert record["data"]["status"] == "failed" and "cifar10-jpg.tar.gz: differs from the manifest" in \
        record["data"]["note"]
    assert record["cuda-tests"]["status"] == "ok"
    assert record["real-run"]["status"] == "skipped"
    assert sorted(p.name for p in out.iterdir()) == ["check.json", "check.log"]
    tail = proc.stdout.splitlines()
    assert any(l.startswith("data") and "failed" in l for l in tail)
