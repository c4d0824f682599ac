"""One call verifies the GPU path: `bash bench/gpu_check.sh OUT [--dry-run] [--stages a,b]` (or
`python -m bench gpu-check ...`).

Installs the GPU bundle (`make gpu-bundle`, carried as .gpu-bundle/) into a target folder without network, then
runs the stages of STAGES in order, each in its own time box (its budget: SIGTERM a little before the end, SIGKILL
at the end), going on past a failed stage. Writes at most MAX_OUT_FILES files into OUT (check.json: environment,
commit, every stage's status, time and note, the targets; check.log: every command and its output; the benches'
JSON tables and the real run's curve) and prints a summary table last.

--dry-run: the same stages end to end on the CPU at tiny sizes, against the bundle installed afresh into a target
folder (CI runs it: tests/test_gpu_check.py), so that neither the bundle nor this script rots between GPU loans.
Exit status: 0 when every stage run passed, 1 when one failed or ran out of time, 2 for a bad argument.
"""
from __future__ import annotations

import argparse
import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
MAX_OUT_FILES = 8          # what one device call brings back
OUT_FILES = ("check.json", "check.log", "loaders.json", "heads.json", "full_step.json", "train.json",
             "train_run.json")
GRACE_S = 12               # SIGTERM this long before a box ends (the training run checkpoints and exits on it)
CUDA_TEST_FILES = ("tests/test_kernels_drloc.py", "tests/test_transforms_affine.py",
                   "tests/test_transforms_autoaugment.py", "tests/test_transforms_sync_free.py",
                   "tests/test_graphed_step.py")
CUDA_TEST_SELECTION = "cuda and not fake_cuda"   # the [cuda] parametrisations and the real-GPU tests
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
            "CROSS_SIZE", "TRITON_INTERPRET")


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int          # time box on an H100/H200
    dry_budget_s: int      # time box of the CPU dry run
    proves: str
    needs: tuple[str, ...] = ()


STAGES = (
    Stage("install", 30, 240, "the bundle installs offline into a target folder; deepspeed, ffcv with its native "
          "libraries and the rest import from there at their pinned versions, every requirement met"),
    Stage("data", 30, 60, "the carried CIFAR-10 copy (sha256-checked) converts to train/test .beton files"),
    Stage("cuda-tests", 75, 60, "the CUDA variants of the equality tests: Triton drloc kernels fwd+bwd vs the "
          "reference, transforms on CUDA vs the CPU, the captured step gives the emulated step's losses, CUDA's "
          "sync detector over the full recipe"),
    Stage("loaders", 60, 90, "loader img/s on the GPU: the reference (PIL workers) vs ffcv vs resident, full "
          "recipe and crop+flip (DALI: not in the bundle)"),
    Stage("heads", 80, 90, "the drloc step eager / torch.compile / fused PyTorch / Triton, and its share of the "
          "training step"),
    Stage("train", 80, 150, "training step img/s at batch 512/1024/2048 (median of 3 x 10 steps): model "
          "only (eager, graphed), ours, through DeepSpeed, graphed, DeepSpeed graphed, the reference pipeline"),
    Stage("real-run", 95, 120, "a short CIFAR-10 run of the ViT + drloc recipe in bf16 with the graphed step: "
          "test accuracy per epoch and the whole loop's img/s", needs=("data",)),
)
TOTAL_BUDGET_S = sum(s.budget_s for s in STAGES)          # 450 s: under 8 minutes with room for the start
# The dry run's boxes only stop a runaway on a loaded 2-core machine; most of its time goes to imports, and on a
# machine's first dry run to DeepSpeed's JIT build of its CPU communication op in the install stage (see
# dry_run_cache: later dry runs reuse it).
REAL_RUN_GPU = ["data.batch_size=1024", "optim.epochs=10", "optim.warmup_epochs=2", "engine.precision=bf16",
                "engine.graph_step=on"]
REAL_RUN_DRY = ["data.batch_size=16", "data.repeats=1", "data.eval_batch_size=50", "optim.epochs=1",
                "optim.warmup_epochs=0", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
                "engine.device=cpu", "engine.precision=fp32", "engine.graph_step=emulate"]


class StageTimeout(Exception):
    pass


@dataclass
class Outcome:
    status: str                         # ok | failed | timeout | skipped
    note: str = ""
    figures: dict = field(default_factory=dict)


@dataclass
class Context:
    repo: Path
    out: Path
    work: Path
    target: Path
    bundle: Path
    dry: bool
    log_path: Path
    python: str = sys.executable
    deadline: float = 0.0               # monotonic time the current stage's box ends
    extensions_dir: Path | None = None  # TORCH_EXTENSIONS_DIR for the stages (the dry run's: see dry_run_cache)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        env["PYTHONPATH"] = os.pathsep.join([str(self.target), str(self.repo)])
        # the interpreter's own ninja first, for every JIT build (DeepSpeed's ops hash the ninja they build with)
        env["PATH"] = os.pathsep.join([str(Path(self.python).parent), env.get("PATH", "")])
        env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
        if self.extensions_dir is not None:
            env["TORCH_EXTENSIONS_DIR"] = str(self.extensions_dir)
        return env

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(text.rstrip("\n") + "\n")

    def run(self, cmd: list[str], check: bool = True) -> int:
        """Run `cmd` in the repo with the bundle on PYTHONPATH, its output into the log, inside the stage's box:
        SIGTERM at the box's end minus GRACE_S, SIGKILL at its end (StageTimeout). check: raise on non-zero."""
        self.log(f"$ {' '.join(cmd)}")
        t0 = time.monotonic()
        with open(self.log_path, "a") as fh:
            proc = subprocess.Popen(cmd, cwd=self.repo, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            grace = min(GRACE_S, max(1.0, 0.2 * (self.deadline - t0)))
            try:
                rc = proc.wait(timeout=max(0.1, self.deadline - grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=max(0.1, self.deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
                self.log(f"[stopped: the stage's time box ended after {time.monotonic() - t0:.0f} s]")
                raise StageTimeout(f"{cmd[2] if len(cmd) > 2 else cmd[0]} stopped at the end of the time box")
        self.log(f"[exit {rc}, {time.monotonic() - t0:.1f} s]")
        if check and rc != 0:
            raise CommandFailed(f"`{_short(cmd)}` exited {rc}: {last_line(self.log_path)}")
        return rc

    def py(self, *args: str, check: bool = True) -> int:
        return self.run([self.python, *args], check=check)


class CommandFailed(Exception):
    pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _short(cmd: list[str]) -> str:
    text = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
    return text if len(text) < 100 else text[:97] + "..."


def last_line(log_path: Path) -> str:
    """The last informative line a command wrote (an exception's message, usually), for the summary."""
    lines = [l.strip() for l in Path(log_path).read_text(errors="replace").splitlines()]
    for line in reversed(lines):
        if line and not line.startswith(("$ ", "[exit", "[stopped")) and not set(line) <= set("-=^~ "):
            return line[:200]
    return ""


# -------------------------------------------------------------------------------------------------- the stages
def stage_install(ctx: Context) -> Outcome:
    from bench.gpu_bundle import verify_bundle

    manifest = verify_bundle(ctx.bundle, "wheels/")
    stamp = ctx.target / ".installed-from"
    digest = json.dumps(sorted((k, v["sha256"]) for k, v in manifest["files"].items() if k.startswith("wheels/")))
    if not ctx.dry and stamp.is_file() and stamp.read_text() == digest:   # a rerun on the same machine
        ctx.log(f"{ctx.target}: this bundle is installed there already")
    else:
        shutil.rmtree(ctx.target, ignore_errors=True)
        ctx.py("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--target", str(ctx.target), "--find-links",
               str(ctx.bundle / "wheels"), "-r", str(ctx.bundle / "requirements.txt"))
        restore_mtimes(ctx.target, ctx.bundle / "wheels")
        stamp.write_text(digest)
    if ctx.dry:   # DeepSpeed's CPU communication op, which every DeepSpeed run here builds on first use: once, now
        ctx.py("-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()")
    probe_json = ctx.work / "probe.json"
    rc = ctx.py("-m", "bench.gpu_bundle", "probe", "--bundle", str(ctx.bundle), "--target", str(ctx.target),
                "--json", str(probe_json), check=False)
    found = json.loads(probe_json.read_text()) if probe_json.is_file() else {"environment": {}, "problems": []}
    env = found["environment"]
    pk = env.get("packages", {})
    note = (f"{len(manifest['packages'])} packages; python {env.get('python')}, torch {pk.get('torch')}, "
            f"deepspeed {pk.get('deepspeed')}, ffcv {pk.get('ffcv')}")
    figures = {"environment": env, "problems": found["problems"]}
    if rc != 0:
        first = found["problems"][0] if found["problems"] else last_line(ctx.log_path)
        return Outcome("failed", f"{len(found['problems'])} problem(s): {first}", figures)
    return Outcome("ok", note, figures)


def restore_mtimes(target: Path, wheels: Path) -> None:
    """Give the installed files the times recorded in the wheels (pip stamps them with the install's time), so
    that a JIT build over the same sources at the same path (DeepSpeed's CPU op in the dry run) stays up to date."""
    import zipfile

    from packaging import tags
    from packaging.utils import parse_wheel_filename

    here = set(tags.sys_tags())
    for wheel in sorted(wheels.glob("*.whl")):
        if not set(parse_wheel_filename(wheel.name)[3]) & here:
            continue
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                path = target / info.filename
                if not info.is_dir() and path.is_file():
                    t = time.mktime(info.date_time + (0, 0, -1))
                    os.utime(path, (t, t))


def dry_run_cache(bundle: Path) -> tuple[Path, Path]:
    """(target, extensions dir) of the dry run: the bundle is installed afresh each time, at one path per machine,
    and DeepSpeed's CPU communication op (built on first use, ~1-2 min on 2 cores) is kept per DeepSpeed wheel,
    so that a dry run after the first reuses the build instead of redoing it for a new path."""
    from bench.gpu_bundle import read_manifest

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smallvit" / "gpu-check-dry"
    manifest = read_manifest(bundle)
    ds = [v["sha256"][:16] for k, v in manifest["files"].items() if Path(k).name.startswith("deepspeed-")]
    return base / "site", base / "torch_extensions" / (ds[0] if ds else "none")


def stage_data(ctx: Context) -> Outcome:
    from bench.gpu_bundle import verify_bundle

    manifest = verify_bundle(ctx.bundle, "data/")
    source = ctx.bundle / manifest["data"]["file"]
    folder = ctx.work / "cifar10"
    metas = [folder / f"{split}.beton.json" for split in ("train", "test")]
    if all(m.is_file() for m in metas):
        ctx.log(f"{folder}: converted already")
    else:
        ctx.py("-m", "engine.cli", "convert", str(source), "--out", str(folder), "--no-progress", "--force",
               *(["--per-class", "10", "--workers", "1"] if ctx.dry else []))
    counts = [json.loads(m.read_text())["num_images"] for m in metas]
    return Outcome("ok", f"cifar10: {counts[0]:,} train / {counts[1]:,} test images in {folder}",
                   {"train_images": counts[0], "test_images": counts[1]})


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / skipped from a pytest JUnit XML file (errors count as failed)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = total["failures"] + total["errors"]
    return {"passed": total["tests"] - failed - total["skipped"], "failed": failed, "skipped": total["skipped"]}


def stage_cuda_tests(ctx: Context) -> Outcome:
    junit = ctx.work / "cuda-tests.xml"
    junit.unlink(missing_ok=True)
    rc = ctx.py("-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-o", "addopts=", "-k", CUDA_TEST_SELECTION,
                "--junitxml", str(junit), *CUDA_TEST_FILES, check=False)
    if rc == 5 or not junit.is_file():
        return Outcome("failed", f"pytest exit {rc}: the selection '{CUDA_TEST_SELECTION}' matched no test")
    counts = junit_counts(junit)
    note = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if ctx.dry:
        note += " (no CUDA here: the CUDA tests skip)"
    elif counts["passed"] == 0:
        return Outcome("failed", note + ": no CUDA test ran (is the GPU visible to torch?)", counts)
    return Outcome("ok" if rc == 0 and counts["failed"] == 0 else "failed", note, counts)


def _rate(x: float) -> str:
    """An img/s figure for a note: thousands separated, small CPU figures with 3 significant digits."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _copy_result(ctx: Context, pattern: str, name: str) -> Path:
    """Copy the one file a bench wrote (`pattern` under the work folder) to OUT/name."""
    found = sorted(glob.glob(str(ctx.work / pattern)))
    if not found:
        raise CommandFailed(f"no {pattern} was written")
    shutil.copyfile(found[-1], ctx.out / name)
    return ctx.out / name


def stage_loaders(ctx: Context) -> Outcome:
    source = ctx.bundle / "data" / "cifar10-jpg.tar.gz"
    size = ["--images", "32", "--batch", "16", "--workers", "1"] if ctx.dry else \
        ["--images", "50000", "--batch", "1024", "--workers", str(os.cpu_count() or 1)]
    ctx.py("-m", "bench", "loaders", "--source", str(source), *size, "--loaders", "torchvision,ffcv,resident",
           "--out-dir", str(ctx.work / "loaders"), "--no-record")
    rows = json.loads(_copy_result(ctx, "loaders/loaders_*.json", "loaders.json").read_text())["rows"]
    best = {r["augment"]: r for r in rows}
    for r in rows:
        if r["images_per_s"] > best[r["augment"]]["images_per_s"]:
            best[r["augment"]] = r
    note = "; ".join(f"{aug}: {r['loader']} {_rate(r['images_per_s'])} img/s ({r.get('vs_reference', 0):.1f}x ref)"
                     for aug, r in best.items()) + "; dali: not in the bundle"
    return Outcome("ok", note, {"rows": len(rows)})


def stage_heads(ctx: Context) -> Outcome:
    tiny = ["--batch", "4", "--steps", "1", "--repeats", "1", "--warmup", "1", "--variants", "eager,fused_torch"] \
        if ctx.dry else []
    failed = []
    for full, name in ((False, "heads.json"), (True, "full_step.json")):
        extra = (["--full-step"] + ([] if ctx.dry else ["--compile-model"])) if full else []
        rc = ctx.py("-m", "bench", "heads", *tiny, *extra, "--out-json", str(ctx.work / "heads" / name),
                    "--no-record", check=False)
        if rc == 0:
            shutil.copyfile(ctx.work / "heads" / name, ctx.out / name)
        else:
            failed.append(f"{'--full-step' if full else 'drloc step'} exited {rc}: {last_line(ctx.log_path)}")
    if failed:
        return Outcome("failed", "; ".join(failed))
    steps = json.loads((ctx.out / "full_step.json").read_text())["results"]
    note = ", ".join(f"{k} {v['relative_median']}" for k, v in steps.items() if k != "no_drloc")
    return Outcome("ok", f"drloc's share of the step: {note}")


def stage_train(ctx: Context) -> Outcome:
    size = ["--batch", "4", "--steps", "1", "--repeats", "1", "--images", "32", "--workers", "0"] if ctx.dry else \
        ["--steps", "10", "--repeats", "3"]   # the bench's CUDA batches (512, 1024, 2048); 3 x 10 steps fit the box
    ctx.py("-m", "bench", "train", *size, "--out-dir", str(ctx.work / "train"), "--no-record")
    rows = json.loads(_copy_result(ctx, "train/train_*.json", "train.json").read_text())["rows"]
    batch = max(r["batch"] for r in rows) if ctx.dry else 1024
    picked = [r for r in rows if r["batch"] == batch]
    return Outcome("ok", f"b{batch}: " + ", ".join(f"{r['variant'].rsplit(' b', 1)[0]} {_rate(r['images_per_s'])}"
                                                   for r in picked) + " img/s")


def stage_real_run(ctx: Context) -> Outcome:
    run_dir = ctx.work / f"run-{time.strftime('%Y%m%dT%H%M%S')}"
    data = ctx.work / "cifar10"
    overrides = [f"data.train={data / 'train.beton'}", f"data.test={data / 'test.beton'}", f"run.out_dir={run_dir}",
                 "run.progress=false", "run.checkpoint_every=1000", *(REAL_RUN_DRY if ctx.dry else REAL_RUN_GPU)]
    cmd = ["-m", "engine.cli", "train", "--config", "configs/cifar10_vit_drloc.yaml", *overrides]
    start = ctx.log_path.stat().st_size
    timed_out = None
    try:
        rc = ctx.py(*cmd, check=False)
    except StageTimeout:   # SIGTERM: the run checkpoints and writes its summary; report what it reached
        rc, timed_out = 143, True
    with open(ctx.log_path, errors="replace") as fh:
        fh.seek(start)
        said = [l.strip() for l in fh if l.strip().startswith(("graphed step", "WARNING graphed step"))]
    run = real_run_record(run_dir, "python " + " ".join(cmd))
    run["graphed_step"] = said[-1] if said else None
    (ctx.out / "train_run.json").write_text(json.dumps(run, indent=2) + "\n")
    evals = run["evals"]
    summary = run.get("summary") or {}
    curve = " -> ".join(f"{e['top1']:.1f}" for e in evals[:1] + evals[-1:]) if evals else "no evaluation"
    note = (f"{len(evals)} epoch(s), test top-1 {curve} %, {_rate(summary.get('images_per_second', 0))} img/s "
            f"whole loop; {run['graphed_step'] or 'graphed step: not reported'}")
    figures = {**summary, "graphed_step": run["graphed_step"]}
    if timed_out:
        return Outcome("timeout", f"{note} (stopped by the time box)", figures)
    if rc != 0 or not evals:
        return Outcome("failed", f"exit {rc}: {last_line(ctx.log_path)}; {note}", figures)
    return Outcome("ok", note, figures)


def real_run_record(run_dir: Path, command: str, max_points: int = 200) -> dict:
    """The run folder's summary, its evaluations and its training loss (thinned to max_points), in one dict."""
    metrics = []
    if (run_dir / "metrics.jsonl").is_file():
        metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [{"step": m["step"], "epoch": m.get("epoch"), "loss": m.get("loss"), "lr": m.get("lr")}
             for m in metrics if m.get("kind") == "train"]
    keep = max(1, -(-len(train) // max_points))
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    return {"command": command, "run_dir": str(run_dir), "summary": summary,
            "evals": [{k: m[k] for k in ("epoch", "step", "top1", "loss") if k in m}
                      for m in metrics if m.get("kind") == "eval"],
            "train_loss": train[::keep]}


STAGE_FUNCTIONS: dict[str, Callable[[Context], Outcome]] = {
    "install": stage_install, "data": stage_data, "cuda-tests": stage_cuda_tests, "loaders": stage_loaders,
    "heads": stage_heads, "train": stage_train, "real-run": stage_real_run}


# -------------------------------------------------------------------------------------------------- targets
def _rows(out: Path, name: str) -> list[dict]:
    path = out / name
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def _by_batch(rows: list[dict], prefix: str) -> dict[int, float]:
    """images_per_s per batch of the train bench's rows whose variant starts with `prefix` + ' ' or ' ('."""
    return {r["batch"]: r["images_per_s"] for r in rows
            if r["variant"].startswith((prefix + " b", prefix + " ("))}


def evaluate_targets(out: Path, results: dict[str, dict]) -> list[dict]:
    """The GPU speed targets from what the stages wrote: one row per comparison that the figures allow."""
    rows = []

    def add(what: str, value: float | None, goal: str, met: bool | None) -> None:
        rows.append({"target": what, "value": None if value is None else round(value, 3), "goal": goal, "met": met})

    train = _rows(out, "train.json")
    ceiling = _by_batch(train, "model_only_graphed")
    ours = _by_batch(train, "ours_deepspeed_graphed")
    plain = _by_batch(train, "ours_graphed")
    for b in sorted(ours):
        if b in ceiling:
            r = ours[b] / ceiling[b]
            add(f"full recipe, DeepSpeed graphed / graphed model only, b{b}", r, ">= 0.95", r >= 0.95)
        if b in plain:
            r = ours[b] / plain[b]
            add(f"DeepSpeed graphed / plain graphed step, b{b}", r, ">= 0.97", r >= 0.97)
    full = out / "full_step.json"
    if full.is_file():
        steps = json.loads(full.read_text())["results"]
        if "triton" in steps and "no_drloc" in steps:
            share = steps["triton"]["median_ms"] / steps["no_drloc"]["median_ms"] - 1
            add("fused (Triton) drloc head's share of the step", share, "<= 0.03", share <= 0.03)
    run = out / "train_run.json"
    if run.is_file():
        summary = json.loads(run.read_text()).get("summary") or {}
        rate = summary.get("images_per_second")
        batch = 1024
        if rate and batch in ours:
            r = rate / ours[batch]
            add(f"real run's whole-loop img/s / step bench (DeepSpeed graphed, b{batch})", r, ">= 0.90", r >= 0.90)
    tests = results.get("cuda-tests", {})
    if tests.get("figures", {}).get("passed"):
        f = tests["figures"]
        add("CUDA equality tests green", f["failed"], "0 failed", f["failed"] == 0)
    return rows


# -------------------------------------------------------------------------------------------------- the run
def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def summary_text(mode: str, results: dict[str, dict], targets: list[dict], seconds: float) -> str:
    table = format_table([[name, r["status"], f"{r['seconds']:.0f}", str(r["budget_s"]), r["note"]]
                          for name, r in results.items()], ["stage", "status", "s", "box s", "note"])
    text = f"GPU check ({mode}), {seconds:.0f} s in all\n{table}"
    if targets:
        t = format_table([[x["target"], "-" if x["value"] is None else str(x["value"]), x["goal"],
                           {True: "met", False: "MISSED", None: "-"}[x["met"]]] for x in targets],
                         ["target", "value", "goal", ""])
        text += "\n\ntargets" + (" (dry run: CPU figures, not the GPU's)" if mode == "dry-run" else "") + "\n" + t
    return text


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_check(ctx: Context, stages: list[Stage], functions: dict[str, Callable[[Context], Outcome]] | None = None,
              echo: Callable[[str], None] = print) -> tuple[int, dict]:
    """Run `stages` in order, each in its box, past failures; write OUT/check.json after each. -> (exit, record)."""
    functions = functions or STAGE_FUNCTIONS
    mode = "dry-run" if ctx.dry else "gpu"
    from bench.gpu_bundle import git_commit, source_digest

    record = {"mode": mode, "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "commit": git_commit(ctx.repo), "source_digest": source_digest(ctx.repo), "bundle": str(ctx.bundle),
              "target": str(ctx.target), "budget_s": sum(s.dry_budget_s if ctx.dry else s.budget_s for s in stages),
              "stages": {}, "targets": []}
    results: dict[str, dict] = record["stages"]
    t_all = time.monotonic()
    for stage in stages:
        budget = stage.dry_budget_s if ctx.dry else stage.budget_s
        ctx.log(f"\n===== {stage.name} (time box {budget} s): {stage.proves}")
        echo(f"[{stage.name}] running (box {budget} s)")
        t0 = time.monotonic()
        ctx.deadline = t0 + budget
        failed_needs = [n for n in stage.needs if results.get(n, {}).get("status") not in (None, "ok")]
        if failed_needs:
            outcome = Outcome("skipped", f"needs {', '.join(failed_needs)}, which did not pass")
        else:
            try:
                outcome = functions[stage.name](ctx)
            except StageTimeout as exc:
                outcome = Outcome("timeout", str(exc))
            except Exception as exc:   # a stage's failure is reported; the next stage still runs
                outcome = Outcome("failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        seconds = time.monotonic() - t0
        results[stage.name] = {"status": outcome.status, "seconds": round(seconds, 1), "budget_s": budget,
                               "note": outcome.note, "proves": stage.proves, "figures": outcome.figures}
        if stage.name == "install" and outcome.figures.get("environment"):
            record["environment"] = outcome.figures["environment"]
        ctx.log(f"===== {stage.name}: {outcome.status} in {seconds:.1f} s: {outcome.note}")
        echo(f"[{stage.name}] {outcome.status} in {seconds:.0f} s: {outcome.note}")
        write_json_atomic(ctx.out / "check.json", record)
    record["targets"] = evaluate_targets(ctx.out, results)
    record["seconds"] = round(time.monotonic() - t_all, 1)
    record["summary"] = summary_text(mode, results, record["targets"], record["seconds"])
    write_json_atomic(ctx.out / "check.json", record)
    ctx.log("\n" + record["summary"])
    written = sorted(p.name for p in ctx.out.iterdir())
    if len(written) > MAX_OUT_FILES:
        raise RuntimeError(f"{ctx.out}: {len(written)} files written, more than the {MAX_OUT_FILES} a call returns")
    echo("\n" + record["summary"])
    ok = all(r["status"] == "ok" for r in results.values())
    return (0 if ok else 1), record


def main(argv: list[str] | None = None) -> int:
    from bench.gpu_bundle import BundleError

    ap = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0],
                                 epilog="stages: " + "; ".join(f"{s.name} ({s.budget_s} s on the GPU, "
                                                               f"{s.dry_budget_s} s dry): {s.proves}"
                                                               for s in STAGES),
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out", metavar="OUT", help=f"output folder (empty or new); at most {MAX_OUT_FILES} files")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes, installing into a temporary "
                                                           "folder (what CI runs)")
    ap.add_argument("--bundle", default=str(REPO / ".gpu-bundle"), help="the bundle folder (make gpu-bundle)")
    ap.add_argument("--target", default=None, help="install folder (default /tmp/smallvit-gpu/site; dry run: "
                                                   "~/.cache/smallvit/gpu-check-dry/site, installed afresh)")
    ap.add_argument("--work", default=None, help="scratch folder for data, bench files and the run (default "
                                                 "/tmp/smallvit-gpu/work; dry run: a temporary folder)")
    ap.add_argument("--stages", default="", help="comma list of stages to run (default all), e.g. to rerun the "
                                                 "failed ones: " + ",".join(s.name for s in STAGES))
    args = ap.parse_args(argv)
    names = [s.name for s in STAGES]
    wanted = [n for n in args.stages.split(",") if n] or names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        print(f"gpu-check: error: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(names)}",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"gpu-check: error: {out}: not an empty folder (the check writes up to {MAX_OUT_FILES} files there)",
              file=sys.stderr)
        return 2
    bundle = Path(args.bundle).resolve()
    if not (bundle / "manifest.json").is_file():
        print(f"gpu-check: error: {bundle}: no bundle there: run `make gpu-bundle` (and carry .gpu-bundle on the "
              f"device call)", file=sys.stderr)
        return 2
    extensions = None
    if args.dry_run:
        try:
            target, extensions = dry_run_cache(bundle)
        except BundleError as exc:
            print(f"gpu-check: error: {exc}", file=sys.stderr)
            return 2
        temp = tempfile.mkdtemp(prefix="gpu-check-")
        work = Path(temp) / "work"
    else:
        temp, target, work = None, Path("/tmp/smallvit-gpu/site"), Path("/tmp/smallvit-gpu/work")
    target = Path(args.target).resolve() if args.target else target
    work = Path(args.work).resolve() if args.work else work
    work.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(REPO, out, work, target, bundle, args.dry_run, out / "check.log", extensions_dir=extensions)
    ctx.log(f"gpu check, {'dry run' if args.dry_run else 'gpu'}: bundle {bundle}, target {target}, work {work}")
    try:
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # one check at a time installs into and runs from a target
            rc, _ = run_check(ctx, [s for s in STAGES if s.name in wanted])
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
