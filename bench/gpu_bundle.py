"""The GPU bundle: everything `bench/gpu_check.sh` needs that the GPU machine's image lacks, in one folder.

    python -m bench.gpu_bundle build [--out .gpu-bundle] [--data ../shared/data/cifar10-jpg.tar.gz]   (make gpu-bundle)
    python -m bench.gpu_bundle verify [--bundle .gpu-bundle]
    python -m bench.gpu_bundle probe --bundle DIR --target DIR [--json FILE]   (run with the target on PYTHONPATH)

The GPU machine (Python 3.12, torch 2.11, no network; its packages in bench/gpu_image.txt) gets:
- wheels/: the closure of smallvit's requirements (setup.py, with the `ffcv` extra) that the image does not hold,
  at the versions installed here (requirements-cpu.lock). deepspeed is built here from its sdist (DS_BUILD_OPS=0,
  pure Python: its ops JIT-build there if used); ffcv is built here against the stable ABI (abi3, any CPython >= 3.8)
  with the native libraries it links (OpenCV core/imgproc, libturbojpeg and theirs) copied into ffcv.libs/ and
  found through $ORIGIN run paths, since the image has neither; a package with compiled code and no abi3 build
  gets its cp312 wheel for the GPU beside this machine's wheel, which only the CPU rehearsal installs.
- data/cifar10-jpg.tar.gz: the CIFAR-10 JPEG copy (sha256-checked); converted there in seconds. A JPEG .beton made
  from it would be larger (FFCV re-encodes at quality 90 and pads pages) and lossier.
- requirements.txt (the pins to install) and manifest.json (every file's size and sha256, the commit and digest
  of the source it was built from, the build time).
Left out: DALI (LEFT_OUT says why). The whole folder stays under SIZE_LIMIT; the build fills OUT.partial and
renames it to OUT only when it is complete.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".gpu-bundle"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
DATA_NAME = "cifar10-jpg.tar.gz"
DATA_SHA256 = "ba71b9da469a0642b511b82cb7e817f919872cb21e6b3681ebca2fc4bdd50bf3"   # shared/data/README.md
IMAGE_LIST = Path(__file__).with_name("gpu_image.txt")
IMAGE_PYTHON = "3.12.3"
SIZE_LIMIT = 60 * 2**20            # bytes: one device call carries 64 MiB with the working tree (~2 MB)
FORMAT = 1

ROOT_EXTRAS = ("ffcv",)            # smallvit's extras the check needs
LEFT_OUT = {"nvidia-dali-cuda130": "its wheel is 199 MB: it would travel split over four device calls of 64 MiB, "
                                   "each re-sending the tree, with only 30 s of warm machine between them (more "
                                   "than the minute of device time it may cost, and lost with the machine); the "
                                   "check leaves DALI's rows out"}
PROVIDED_BY = {"opencv-python": "opencv-python-headless"}   # ffcv asks for the GUI build; the same cv2 module
ALWAYS_CARRY = {"typing-extensions": "pydantic asks for a recent one (>=4.16) and the image's version is not "
                                     "recorded; it only adds names, so a newer copy is safe for everything else"}
BUILT_HERE = ("deepspeed", "ffcv")
LIMITED_API = "0x03080000"         # ffcv's extension against the stable ABI of CPython 3.8+
SOURCE_DATE_EPOCH = "315532800"    # 1980-01-01, zip's first date: the wheels built here are byte-reproducible
# libraries every Linux with a C++ runtime has, newer there than here: never copied next to ffcv
SYSTEM_LIBS = re.compile(r"^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libresolv|libutil|libstdc\+\+|"
                         r"libgcc_s)\.so")


class BundleError(Exception):
    """A bundle that cannot be built, installed or trusted; the message names the package or file. `code` is the
    exit status: 2 for what the user gave (a missing bundle or data file), 1 for a failed build."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ what to carry
def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_LIST) -> dict[str, str | None]:
    """The image's packages: canonical name -> version (None where the list records none)."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonical(name)] = version or None
    return out


def marker_env(extra: str = "") -> dict[str, str]:
    """The environment markers of the GPU machine's interpreter (PEP 508)."""
    major_minor = ".".join(IMAGE_PYTHON.split(".")[:2])
    return {"python_version": major_minor, "python_full_version": IMAGE_PYTHON, "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_release": "", "platform_version": "", "implementation_version": IMAGE_PYTHON, "extra": extra}


@dataclass
class Carried:
    name: str          # canonical
    version: str       # as installed here (the lock's pin)
    needed_by: str     # the package whose requirement brought it in
    why: str = ""      # only for ALWAYS_CARRY


def carry_list(roots: Iterable[str], image: dict[str, str | None], requires_of: Callable[[str], list[str]],
               version_of: Callable[[str], str | None], root_extras: Iterable[str] = ROOT_EXTRAS,
               ) -> tuple[list[Carried], list[str]]:
    """Walk the requirements from `roots` (smallvit's Requires-Dist strings) for the GPU machine's interpreter and
    return (what the image lacks, in discovery order; requirements on image packages whose version the list does
    not record, as lines to check there). A requirement the image's recorded version breaks raises BundleError."""
    from packaging.requirements import Requirement

    carried: dict[str, Carried] = {}
    unverified: list[str] = []
    queue = [(r, "smallvit", ("", *root_extras)) for r in roots]
    while queue:
        text, parent, extras = queue.pop(0)
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate(marker_env(e)) for e in extras):
            continue
        name = canonical(req.name)
        if name in LEFT_OUT:
            continue
        provided = canonical(PROVIDED_BY.get(name, name))
        if provided in image and name not in ALWAYS_CARRY:
            have = image[provided]
            if have is None:
                if str(req.specifier):
                    unverified.append(f"{parent} needs {req}; the image has {provided} (version not recorded)")
            elif not req.specifier.contains(have, prereleases=True):
                raise BundleError(f"{parent} needs {req}, but the GPU image has {provided} {have}: pin a version "
                                  f"that works with it, or carry {provided} (add it to ALWAYS_CARRY)")
            continue
        version = version_of(name)
        if version is None:
            raise BundleError(f"{name} (needed by {parent}) is not installed here: run `make setup` first")
        if not req.specifier.contains(version, prereleases=True):
            raise BundleError(f"{parent} needs {req}, but {name} {version} is installed here (the lock's pin)")
        if name in carried:
            continue
        carried[name] = Carried(name, version, parent, ALWAYS_CARRY.get(name, ""))
        queue += [(r, name, ("",)) for r in requires_of(name)]
    return list(carried.values()), unverified


def installed_metadata() -> tuple[list[str], Callable[[str], list[str]], Callable[[str], str | None]]:
    """(smallvit's requirements, requires_of, version_of) read from this interpreter's installed distributions."""
    from importlib import metadata

    def requires_of(name: str) -> list[str]:
        return list(metadata.distribution(name).requires or [])

    def version_of(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        roots = requires_of("smallvit")
    except metadata.PackageNotFoundError:
        raise BundleError("smallvit is not installed in this interpreter: run `make setup` first") from None
    return roots, requires_of, version_of


# ------------------------------------------------------------------------------------------------ wheel tags
def image_tags() -> set:
    """Every wheel tag the GPU machine's pip accepts (CPython 3.12, manylinux x86_64 up to glibc 2.39)."""
    from packaging import tags

    platforms = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + \
                ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    version = tuple(int(v) for v in IMAGE_PYTHON.split(".")[:2])
    return set(tags.cpython_tags(version, abis=[f"cp{version[0]}{version[1]}"], platforms=platforms)) | \
        set(tags.compatible_tags(version, f"cp{version[0]}{version[1]}", platforms))


def host_tags() -> set:
    from packaging import tags

    return set(tags.sys_tags())


def wheel_tags(filename: str) -> set:
    from packaging.utils import parse_wheel_filename

    return set(parse_wheel_filename(filename)[3])


def image_cli_tags() -> list[str]:
    """pip options that make it choose wheels for the GPU machine (pip matches manylinux versions exactly)."""
    major, minor = IMAGE_PYTHON.split(".")[:2]
    args = ["--only-binary=:all:", "--python-version", f"{major}.{minor}", "--implementation", "cp",
            "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none"]
    for n in range(17, 40):
        args += ["--platform", f"manylinux_2_{n}_x86_64"]
    return args + ["--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]


# ------------------------------------------------------------------------------------------------ building
def _run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> str:
    """Run a build command; on failure raise BundleError with the command and the end of its output."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})}
    proc = subprocess.run(cmd, env=full_env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BundleError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def pip(*args: str, env: dict | None = None) -> str:
    return _run([sys.executable, "-m", "pip", *args], env=env)


# The two builds below pass --no-cache-dir: pip would otherwise reuse a wheel it built from the same sdist with other
# flags (make setup builds ffcv without the stable ABI).
def build_deepspeed(version: str, wheels: Path, env: dict) -> None:
    """DeepSpeed publishes an sdist only: build its pure-Python wheel here (no ops compiled; torch from this venv)."""
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--no-binary", "deepspeed", "-w",
        str(wheels), f"deepspeed=={version}", env={**env, "DS_BUILD_OPS": "0"})


def shared_libraries(so: Path) -> list[tuple[str, Path]]:
    """(soname, file) of every library `so` loads, transitively, except the system ones (SYSTEM_LIBS)."""
    out = _run(["ldd", str(so)])
    libs = []
    for line in out.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if not arrow or SYSTEM_LIBS.match(name):
            continue
        path = rest.split(" (")[0].strip()
        if path == "not found" or not path:
            raise BundleError(f"{so.name} needs {name}, which is not installed here (make setup installs "
                              f"libopencv-dev and libturbojpeg0-dev)")
        libs.append((name, Path(path).resolve()))
    return libs


def build_ffcv(version: str, wheels: Path, scratch: Path, env: dict) -> None:
    """ffcv's wheel for any CPython >= 3.8 with its native libraries inside: the extension is compiled against the
    stable ABI (it uses no more of Python than a module definition; ffcv calls it through ctypes), renamed
    _libffcv.abi3.so, and finds OpenCV, libturbojpeg and their libraries in ffcv.libs/ through $ORIGIN."""
    built = scratch / "ffcv-host"
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--no-binary", "ffcv", "-w", str(built),
        f"ffcv=={version}", env={**env, "CPPFLAGS": f"-DPy_LIMITED_API={LIMITED_API} -g0"})   # -g0: no build path
    [host_wheel] = built.glob("ffcv-*.whl")
    tree_parent = scratch / "ffcv-tree"
    _run([sys.executable, "-m", "wheel", "unpack", "-d", str(tree_parent), str(host_wheel)])
    [tree] = tree_parent.iterdir()
    [so] = (tree / "ffcv").glob("_libffcv*.so")
    abi3 = so.with_name("_libffcv.abi3.so")
    so.rename(abi3)
    libs_dir = tree / "ffcv.libs"
    libs_dir.mkdir()
    for soname, path in shared_libraries(abi3):
        target = libs_dir / soname
        shutil.copyfile(path, target)
        _run(["patchelf", "--set-rpath", "$ORIGIN", str(target)])
    _run(["patchelf", "--set-rpath", "$ORIGIN/../ffcv.libs", str(abi3)])
    [wheel_file] = tree.glob("*.dist-info/WHEEL")
    text = re.sub(r"(?m)^Tag: .*\n", "", wheel_file.read_text())
    wheel_file.write_text(text.rstrip("\n") + "\nTag: cp38-abi3-linux_x86_64\n")
    _run([sys.executable, "-m", "wheel", "pack", "-d", str(wheels), str(tree)], env=env)


def plain_wheels(carried: list[Carried], wheels: Path, env: dict) -> None:
    """Wheels of everything not built here: this machine's (pure ones serve both), plus a cp312 wheel for each
    package whose wheel here is for this interpreter only."""
    pins = [f"{c.name}=={c.version}" for c in carried if c.name not in BUILT_HERE]
    if not pins:
        return
    before = set(wheels.iterdir())
    pip("wheel", "-q", "--no-deps", "-w", str(wheels), *pins, env=env)
    gpu = image_tags()
    host_only = [f for f in set(wheels.iterdir()) - before if not wheel_tags(f.name) & gpu]
    if host_only:
        names = {canonical(f.name.split("-")[0]) for f in host_only}
        pip("download", "-q", "--no-deps", *image_cli_tags(), "-d", str(wheels),
            *[p for p in pins if canonical(p.split("==")[0]) in names], env=env)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


SOURCE_PARTS = ("engine", "loaders", "kernels", "bench", "configs", "tests", "setup.py")


def source_digest(repo: Path = REPO) -> str:
    """sha256 over the project's source files (paths and contents; caches and bench results excluded): the GPU
    machine's copy of the tree has no git history, so this ties a check's figures to the code that made them."""
    h = hashlib.sha256()
    for part in SOURCE_PARTS:
        root = repo / part
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(repo).as_posix()
            if "__pycache__" in rel or rel.startswith("bench/results/") or f.suffix == ".pyc":
                continue
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def git_commit(repo: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                           text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def build(out: Path = DEFAULT_OUT, data: Path = DEFAULT_DATA, log: Callable[[str], None] = print) -> dict:
    """Build the bundle into `out` (replacing an old one only once the new one is complete); return its manifest."""
    t0 = time.perf_counter()
    data = Path(data)
    if not data.is_file():
        raise BundleError(f"{data}: not found (the CIFAR-10 JPEG copy for the real run; pass --data PATH)", 2)
    roots, requires_of, version_of = installed_metadata()
    carried, unverified = carry_list(roots, image_packages(), requires_of, version_of)
    log("carrying " + ", ".join(f"{c.name} {c.version}" for c in carried))
    out = Path(out).resolve()
    partial = out.with_name(out.name + ".partial")   # beside it, so that the rename stays on one file system
    shutil.rmtree(partial, ignore_errors=True)
    env = {"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "PYTHONHASHSEED": "0"}   # deepspeed orders its extras by a set
    try:
        wheels = partial / "wheels"
        wheels.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as scratch:
            versions = {c.name: c.version for c in carried}
            if "deepspeed" in versions:
                log("building deepspeed's wheel (pure Python, DS_BUILD_OPS=0)")
                build_deepspeed(versions["deepspeed"], wheels, env)
            if "ffcv" in versions:
                log("building ffcv's abi3 wheel with its native libraries")
                build_ffcv(versions["ffcv"], wheels, Path(scratch), env)
            log("fetching the other wheels")
            plain_wheels(carried, wheels, env)
            pins = "".join(f"{c.name}=={c.version}\n" for c in carried)
            (partial / "requirements.txt").write_text(
                "# installed on the GPU machine by bench/gpu_check.sh: pip install --no-index --no-deps "
                "--find-links wheels --target DIR -r requirements.txt\n" + pins)
            log("resolving the install as the GPU machine's pip will (CPython 3.12, manylinux x86_64)")
            pip("install", "-q", "--dry-run", "--no-index", "--no-deps", "--find-links", str(wheels),
                *image_cli_tags(), "--target", str(Path(scratch) / "dry-run-target"), "-r",
                str(partial / "requirements.txt"))
        log(f"copying {data}")
        (partial / "data").mkdir()
        shutil.copyfile(data, partial / "data" / DATA_NAME)
        if sha256(partial / "data" / DATA_NAME) != DATA_SHA256:
            raise BundleError(f"{data}: sha256 differs from the CIFAR-10 copy that shared/data/README.md describes")
        manifest = make_manifest(partial, carried, unverified, time.perf_counter() - t0)
        check_complete(partial, manifest)
        if manifest["total_bytes"] > SIZE_LIMIT:
            raise BundleError(f"the bundle is {manifest['total_bytes'] / 2**20:.1f} MiB, over its "
                              f"{SIZE_LIMIT / 2**20:.0f} MiB limit")
        manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"wrote {out}: {manifest['total_bytes'] / 2**20:.1f} MiB in {len(manifest['files'])} files, "
        f"{manifest['build_seconds']:.0f} s")
    return manifest


def make_manifest(folder: Path, carried: list[Carried], unverified: list[str], seconds: float) -> dict:
    gpu, host = image_tags(), host_tags()
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        entry = {"bytes": f.stat().st_size, "sha256": sha256(f)}
        if f.suffix == ".whl":
            tags = wheel_tags(f.name)
            entry["for"] = "both" if tags & gpu and tags & host else "gpu" if tags & gpu else "rehearsal"
            entry["package"] = canonical(f.name.split("-")[0])
        files[rel] = entry
    return {"format": FORMAT, "built_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "build_seconds": round(seconds, 1), "commit": git_commit(), "source_digest": source_digest(),
            "image_python": IMAGE_PYTHON, "host_python": sys.version.split()[0],
            "packages": [{"name": c.name, "version": c.version, "needed_by": c.needed_by,
                          **({"why": c.why} if c.why else {})} for c in carried],
            "data": {"file": f"data/{DATA_NAME}", "sha256": DATA_SHA256,
                     "what": "CIFAR-10, 50,000 train + 10,000 test JPEGs as an ImageFolder tar.gz"},
            "left_out": LEFT_OUT, "unverified": unverified, "files": files,
            "total_bytes": sum(e["bytes"] for e in files.values()), "limit_bytes": SIZE_LIMIT}


def check_complete(folder: Path, manifest: dict) -> None:
    """Every carried package has a wheel the GPU machine accepts and one this machine accepts (the rehearsal)."""
    for pkg in manifest["packages"]:
        kinds = {e["for"] for e in manifest["files"].values() if e.get("package") == pkg["name"]}
        if not kinds & {"gpu", "both"}:
            raise BundleError(f"{folder}: no wheel of {pkg['name']} for the GPU machine (CPython {IMAGE_PYTHON})")
        if not kinds & {"rehearsal", "both"}:
            raise BundleError(f"{folder}: no wheel of {pkg['name']} for this machine (the dry run installs it)")


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle}: no bundle there (no manifest.json): run `make gpu-bundle`", 2) from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: format {manifest.get('format')}, this code reads {FORMAT}: rebuild it")
    return manifest


def verify_bundle(bundle: Path, part: str = "") -> dict:
    """Read the manifest and check the files under `part` ('' = all; 'wheels/', 'data/'): present, with the
    recorded size and sha256. Returns the manifest; raises BundleError naming the first file at fault."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    for rel, entry in manifest["files"].items():
        if not rel.startswith(part):
            continue
        f = bundle / rel
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle")
        if f.stat().st_size != entry["bytes"] or sha256(f) != entry["sha256"]:
            raise BundleError(f"{f}: differs from the manifest (size or sha256): rebuild the bundle")
    return manifest


# ------------------------------------------------------------------------------------------------ probe (there)
def probe(bundle: Path, target: Path) -> tuple[dict, list[str]]:
    """In the interpreter that will run the check, with `target` first on sys.path: every carried package resolves
    from the target at its pinned version, its requirements are met, its modules import (ffcv's native library
    included). Returns (environment facts, problems)."""
    import importlib
    from importlib import metadata

    from packaging.requirements import Requirement

    manifest = read_manifest(bundle)
    target = Path(target).resolve()
    problems = []
    for pkg in manifest["packages"]:
        try:
            dist = metadata.distribution(pkg["name"])
        except metadata.PackageNotFoundError:
            problems.append(f"{pkg['name']}: not installed")
            continue
        where = Path(dist.locate_file("")).resolve()
        if dist.version != pkg["version"] or where != target:
            problems.append(f"{pkg['name']}: found {dist.version} in {where}, not {pkg['version']} in {target}")
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = PROVIDED_BY.get(canonical(req.name), req.name)
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                problems.append(f"{pkg['name']} needs {req}: not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                problems.append(f"{pkg['name']} needs {req}: {name} {have} is installed")
        for module in top_level_modules(dist) + (["ffcv.libffcv"] if pkg["name"] == "ffcv" else []):
            try:
                importlib.import_module(module)
            except Exception as exc:   # any import failure is a finding, not a crash of the probe
                problems.append(f"import {module} ({pkg['name']}): {type(exc).__name__}: {exc}")
    return environment(manifest), problems


def top_level_modules(dist) -> list[str]:
    """The importable top-level names a distribution installs (top_level.txt, else its RECORD), private ones left
    out."""
    names = (dist.read_text("top_level.txt") or "").split()
    if not names:
        for f in dist.files or []:
            first = f.parts[0]
            if len(f.parts) == 1 and first.endswith(".py"):
                names.append(first[:-3])
            elif len(f.parts) > 1 and f.parts[-1] == "__init__.py" and len(f.parts) == 2:
                names.append(first)
    return sorted({n for n in names if not n.startswith("_")})


def environment(manifest: dict | None = None) -> dict:
    """The machine and the versions the check ran with (torch and the GPU, the carried and the image's packages)."""
    import platform
    from importlib import metadata

    env = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "commit": git_commit(), "source_digest": source_digest()}
    if manifest:
        env["bundle"] = {"built_utc": manifest["built_utc"], "commit": manifest["commit"],
                         "source_digest_matches": manifest["source_digest"] == env["source_digest"]}
    versions = {}
    for name in ("torch", "torchvision", "timm", "triton", "numpy", "numba", "opencv-python-headless",
                 "deepspeed", "ffcv", "pydantic", "pytest", "tensorboard"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env["packages"] = versions
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_gib": round(props.total_memory / 2**30, 1),
                          "multiprocessors": props.multi_processor_count}
    except Exception as exc:   # torch itself broken: say so in the facts
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia_smi"] = None
    return env


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_bundle", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the bundle (make gpu-bundle)")
    b.add_argument("--out", default=str(DEFAULT_OUT), help="bundle folder")
    b.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 JPEG copy to carry")
    v = sub.add_parser("verify", help="check every file against the manifest")
    v.add_argument("--bundle", default=str(DEFAULT_OUT))
    p = sub.add_parser("probe", help="check the installed bundle from the interpreter that runs the check")
    p.add_argument("--bundle", default=str(DEFAULT_OUT))
    p.add_argument("--target", required=True, help="the folder the bundle was installed into")
    p.add_argument("--json", default="", help="write the environment facts and problems here")
    args = ap.parse_args(argv)
    try:
        if args.command == "build":
            build(Path(args.out), Path(args.data))
        elif args.command == "verify":
            manifest = verify_bundle(Path(args.bundle))
            print(f"{args.bundle}: {len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.1f} MiB, "
                  f"all as in the manifest (built {manifest['built_utc']} from {manifest['commit']})")
        else:
            env, problems = probe(Path(args.bundle), Path(args.target))
            if args.json:
                Path(args.json).write_text(json.dumps({"environment": env, "problems": problems}, indent=2) + "\n")
            for line in problems:
                print(f"bundle problem: {line}", file=sys.stderr)
            print(f"{len(problems)} problem(s); python {env['python']}, torch {env['packages']['torch']}, "
                  f"deepspeed {env['packages']['deepspeed']}, ffcv {env['packages']['ffcv']}, "
                  f"gpu {env.get('gpu', {}).get('name') if env.get('gpu') else None}")
            return 1 if problems else 0
    except BundleError as exc:
        print(f"gpu-bundle: error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
