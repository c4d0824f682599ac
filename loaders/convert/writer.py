"""The one .beton writer: FFCV's DatasetWriter behind an atomic rename, plus the JSON sidecar.

A source is any object with
    __len__() -> N
    __getitem__(i) -> (image: uint8 ndarray (H, W, 3), label: int)
    classes: list[str]                     # label i names classes[i]
    name: str                              # dataset name recorded in the sidecar ('cifar10', ...)
    split: str                             # 'train' / 'test' / ...
    source_checksum() -> str               # sha256 of what it read (files or arrays)
and optionally
    labels: (N,) int array                 # all labels, known without decoding: checked before anything is written
    locate(i) -> str                       # where sample i comes from ('x.tar.gz:train/cat/0001.jpg'), for errors
    origin: str                            # the file or folder the split was read from
    source_info: dict                      # extra facts recorded under the sidecar's "source" key

Statistics (per-channel mean/std, class histogram, image sizes) are accumulated by the FFCV worker processes from
the very pixels they store (after any --max-resolution resize), as exact integer sums, so a file-backed source is
decoded once and the result does not depend on the number of workers or the chunking.

The bytes depend only on the source and the options: the finished file is rewritten with the page layout one
worker gives and no stray padding bytes (loaders/convert/layout.py), so any worker count gives the same file, whose
SHA-256 the sidecar records ("sha256"; "head_sha256" covers the header and tables, checked on every open).

Nothing is ever half-written at the final path: the .beton goes to a hidden temporary file in the same folder and
is renamed only after FFCV finished and the sidecar was computed; any exception (Ctrl-C included) removes it.
`stage_beton` + `commit_all(staged)` let a caller write several splits and rename them all or none.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from loaders.atomic import fsync_dir, temp_path
from loaders.convert.layout import single_writer_layout
from loaders.convert.trees import file_sha256
from loaders.sidecar import SIDECAR_FORMAT, DatasetFileError, head_digest, sidecar_path

# FFCV keeps one page per worker in memory and a sample must fit in a page: 8 MiB holds a raw 1670x1670 image.
PAGE_SIZE = 1 << 23


class ImageSource(Protocol):
    classes: list[str]
    name: str
    split: str

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...
    def source_checksum(self) -> str: ...


@dataclass
class WriteOptions:
    mode: str = "raw"                      # 'raw' pixels or 'jpg'
    jpeg_quality: int = 90
    max_resolution: Optional[int] = None   # longest side in pixels; larger images are resized down (INTER_AREA)
    num_workers: int = -1                  # -1 = all cores
    chunksize: int = 256
    force: bool = False                    # overwrite an existing .beton
    progress: bool = True
    skip_corrupt: bool = False             # leave out samples that fail to decode instead of stopping


@dataclass
class SkippedSample:
    index: int          # index in the source split
    where: str          # file (and archive member) it came from
    reason: str

    def as_dict(self) -> dict:
        return {"index": self.index, "file": self.where, "reason": self.reason}


@dataclass
class WriteStats:
    """Exact integer counts over the stored pixels of one split: order- and worker-independent."""
    num_classes: int
    histogram: np.ndarray = None       # (3, 256) int64: how many pixels of each channel have each value 0..255
    counts: np.ndarray = None          # (num_classes,) int64
    min_hw: tuple = (1 << 30, 1 << 30)
    max_hw: tuple = (0, 0)

    def __post_init__(self):
        self.histogram = np.zeros((3, 256), np.int64) if self.histogram is None else self.histogram
        self.counts = np.zeros(self.num_classes, np.int64) if self.counts is None else self.counts

    def add(self, image: np.ndarray, label: int) -> None:
        """image: uint8 (H, W, 3). A per-channel bincount is ~5x cheaper than summing squares in int64."""
        flat = image.reshape(-1, 3)
        for c in range(3):
            self.histogram[c] += np.bincount(flat[:, c], minlength=256)
        self.counts[label] += 1
        h, w = image.shape[:2]
        self.min_hw = (min(self.min_hw[0], h), min(self.min_hw[1], w))
        self.max_hw = (max(self.max_hw[0], h), max(self.max_hw[1], w))

    def merge(self, other: "WriteStats") -> None:
        self.histogram += other.histogram
        self.counts += other.counts
        self.min_hw = (min(self.min_hw[0], other.min_hw[0]), min(self.min_hw[1], other.min_hw[1]))
        self.max_hw = (max(self.max_hw[0], other.max_hw[0]), max(self.max_hw[1], other.max_hw[1]))

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std as fractions of 255 (population std, computed from exact integer sums)."""
        values = np.arange(256, dtype=np.int64)
        p = max(int(self.histogram[0].sum()), 1)
        mean, std = [], []
        for c in range(3):
            s, q = int(self.histogram[c] @ values), int(self.histogram[c] @ (values * values))
            mean.append(s / p / 255.0)
            std.append(float(np.sqrt(max(q * p - s * s, 0)) / p / 255.0))   # sqrt(p·Σx² − (Σx)²)/p, exact ints
        return mean, std


def sidecar_meta(*, dataset: str, split: str, classes: list[str], stats: WriteStats, mode: str,
                 jpeg_quality: Optional[int], max_resolution: Optional[int], beton: Path, seconds: float,
                 source: dict, skipped: list[dict]) -> dict:
    """The sidecar of the .beton at `beton` whose stored pixels `stats` counted (loaders/sidecar.py's format)."""
    uniform = stats.min_hw == stats.max_hw
    mean, std = stats.mean_std()
    return {
        "format": SIDECAR_FORMAT,
        "dataset": dataset,
        "split": split,
        "classes": list(classes),
        "num_classes": len(classes),
        "num_images": int(stats.counts.sum()),
        "class_counts": stats.counts.tolist(),
        "image": {"mode": mode,
                  "height": int(stats.max_hw[0]) if uniform else None,
                  "width": int(stats.max_hw[1]) if uniform else None,
                  "min_size": [int(v) for v in stats.min_hw], "max_size": [int(v) for v in stats.max_hw],
                  "jpeg_quality": jpeg_quality, "max_resolution": max_resolution},
        "mean": mean, "std": std,
        "source": source,
        "skipped": skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bytes": beton.stat().st_size,
        "head_sha256": head_digest(beton),   # FFCV's header and tables: checked on every open (read_sidecar)
        "sha256": file_sha256(beton),        # the whole file: the same for any worker count (checked by --verify)
        "seconds": round(seconds, 3),
    }


def channel_stats(source: Any, progress: bool = False) -> tuple[list[float], list[float], list[int]]:
    """Per-channel mean and std (fractions of 255) and the class histogram of a source, in one plain pass.

    The reference for the statistics the writer's workers accumulate; float64 running sums.
    """
    n_classes = len(source.classes)
    counts = np.zeros(n_classes, dtype=np.int64)
    total = np.zeros(3, dtype=np.float64)
    total_sq = np.zeros(3, dtype=np.float64)
    pixels = 0
    images = getattr(source, "images", None)
    if isinstance(images, np.ndarray):
        labels = np.asarray(source.labels, dtype=np.int64)
        for start in range(0, len(images), 4096):
            chunk = images[start:start + 4096].astype(np.float64).reshape(-1, 3)
            total += chunk.sum(0)
            total_sq += (chunk * chunk).sum(0)
            pixels += chunk.shape[0]
        check_labels(labels, n_classes, source)
        counts += np.bincount(labels, minlength=n_classes)
    else:
        for i in range(len(source)):
            image, label = source[i]
            flat = np.asarray(image, dtype=np.float64).reshape(-1, 3)
            total += flat.sum(0)
            total_sq += (flat * flat).sum(0)
            pixels += flat.shape[0]
            check_labels(np.array([label]), n_classes, source, offset=i)
            counts[label] += 1
    mean = total / max(pixels, 1)
    var = np.maximum(total_sq / max(pixels, 1) - mean * mean, 0.0)
    return (mean / 255.0).tolist(), (np.sqrt(var) / 255.0).tolist(), counts.tolist()


def check_labels(labels: np.ndarray, n_classes: int, source: Any, offset: int = 0) -> None:
    """Raise DatasetFileError naming the file and sample index of the first label outside 0..n_classes-1."""
    labels = np.asarray(labels)
    bad = np.nonzero((labels < 0) | (labels >= n_classes))[0]
    if len(bad):
        i = int(bad[0]) + offset
        raise DatasetFileError(f"{locate(source, i)}: label {int(labels[bad[0]])} of sample {i} "
                               f"is outside 0..{n_classes - 1}")


def locate(source: Any, i: int) -> str:
    """Where sample i of `source` comes from, for error messages."""
    if hasattr(source, "locate"):
        try:
            return source.locate(i)
        except Exception:  # noqa: BLE001 - never let the error path itself fail
            pass
    return f"{getattr(source, 'origin', '') or source.name}[{i}]"


def prepare_image(image: Any, max_resolution: Optional[int]) -> np.ndarray:
    """Check an image is uint8 (H, W, 3) and shrink its longest side to `max_resolution` as FFCV would."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if max_resolution:
        from ffcv.fields.rgb_image import resizer

        image = resizer(image, max_resolution)
    return image


def _ffcv_fields(options: WriteOptions) -> dict:
    from ffcv.fields import IntField, RGBImageField

    # Resizing happens in prepare_image (so statistics see the stored pixels); FFCV's own resize stays off.
    image_kwargs: dict[str, Any] = {"write_mode": options.mode}
    if options.mode == "jpg":
        image_kwargs["jpeg_quality"] = options.jpeg_quality
    return {"image": RGBImageField(**image_kwargs), "label": IntField()}


class SampleTooLarge(ValueError):
    """A sample whose stored bytes exceed one .beton page (FFCV cannot split a sample across pages)."""

    def __init__(self, size: int, page_size: int):
        super().__init__(f"stored as {size} bytes, more than a .beton page ({page_size} bytes)")
        self.size, self.page_size = size, page_size


def _page_allocator(base):
    """FFCV's MemoryAllocator, raising SampleTooLarge (with the sizes) instead of a bare ValueError."""

    class PageAllocator(base):
        def malloc(self, size):
            if size > self.page_size:
                raise SampleTooLarge(int(size), int(self.page_size))
            return super().malloc(size)

    return PageAllocator


def fitting_resolution(height: int, width: int, nbytes: int, page_size: int, mode: str) -> int:
    """A --max-resolution (longest side, pixels) under which an image of height x width stored as `nbytes` fits
    in a page: exact for raw pixels (FFCV's own resize arithmetic), an estimate with room to spare for JPEG."""
    longest = max(height, width)
    if mode != "raw":
        side = int(longest * np.sqrt(page_size / nbytes) * 0.7)
        return max(64, side // 64 * 64)
    side = int(longest * np.sqrt(page_size / (3 * height * width))) + 1
    while side > 1:
        w, h = (side / longest * np.array([width, height])).astype(int)
        if 3 * int(h) * int(w) <= page_size:
            return side
        side -= 1
    return 1


def failure_reason(exc: Exception, image: Optional[np.ndarray], mode: str, skipping: bool) -> str:
    """What the user reads for a sample that failed, with the option that gets past it where there is one."""
    from loaders.convert.images import ImageDecodeError

    if isinstance(exc, SampleTooLarge) and image is not None:
        h, w = image.shape[:2]
        fit = fitting_resolution(h, w, exc.size, exc.page_size, mode)
        return (f"{'JPEG' if mode == 'jpg' else 'raw'} {h}x{w} image of {exc.size / 2**20:.1f} MiB, more than the "
                f"{exc.page_size / 2**20:.0f} MiB a .beton page holds: convert with --max-resolution {fit}"
                + (" (or a lower --jpeg-quality)" if mode == "jpg" else ""))
    if isinstance(exc, ImageDecodeError) and not skipping:
        return f"{exc}; --skip-corrupt leaves such images out (listed in the summary and the sidecar)"
    return str(exc) if isinstance(exc, DatasetFileError) else f"{type(exc).__name__}: {exc}"


def _worker_job(input_queue, metadata_sm, metadata_type, fields, allocator, done_number, allocations_queue,
                source, report_queue, max_resolution, skip_corrupt, num_classes, mode):
    """FFCV's worker_job_indexed_dataset plus: per-sample errors reported (or skipped) with the file named,
    statistics of the stored pixels, and SIGINT left to the parent (which terminates us)."""
    from ffcv.writer import handle_sample

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    field_names = metadata_type.names
    stats = WriteStats(num_classes)
    placeholder = (np.zeros((1, 1, 3), np.uint8), 0)
    with allocator:
        while True:
            chunk = input_queue.get()
            if chunk is None:
                break
            for dest_ix, source_ix in chunk:
                image = None
                try:
                    image, label = source[source_ix]
                    image = prepare_image(image, max_resolution)
                    label = int(label)
                    if not 0 <= label < num_classes:
                        raise ValueError(f"label {label} is outside 0..{num_classes - 1}")
                    handle_sample((image, label), dest_ix, field_names, metadata, allocator, fields)
                    stats.add(image, label)
                except Exception as exc:  # noqa: BLE001 - every failure is reported with the file named
                    where = locate(source, int(source_ix))
                    reason = failure_reason(exc, image, mode, skip_corrupt)
                    if not skip_corrupt:
                        report_queue.put(("error", int(source_ix), where, reason))
                        report_queue.close()
                        report_queue.join_thread()
                        os._exit(1)  # the parent terminates the other workers; no page of ours may be flushed
                    report_queue.put(("skip", int(source_ix), where, reason))
                    handle_sample(placeholder, dest_ix, field_names, metadata, allocator, fields)
            with done_number.get_lock():
                done_number.value += len(chunk)
    report_queue.put(("stats", stats))
    allocations_queue.put(allocator.allocations)


def _run_ffcv(source: Any, tmp: Path, indices: np.ndarray, options: WriteOptions, workers: int,
              desc: str) -> tuple[WriteStats, list[SkippedSample]]:
    """Write source[indices] to `tmp` with FFCV's DatasetWriter and our worker job; -> (stats, skipped)."""
    import ctypes

    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    from ffcv.fields.rgb_image import IMAGE_MODES

    IMAGE_MODES["raw"]  # numba compiles this typed-dict lookup on first use (~1 s); do it once, before the fork
    ctx = multiprocessing.get_context("fork")  # the source (open archives, arrays) is inherited, never pickled
    writer = DatasetWriter(str(tmp), _ffcv_fields(options), page_size=PAGE_SIZE, num_workers=workers)
    n = len(indices)
    writer.num_samples = n
    writer.prepare()
    processes: list = []
    ok = False
    try:
        work = ctx.Queue()
        for chunk in chunks(list(enumerate(indices.tolist())), options.chunksize):
            work.put(chunk)
        for _ in range(workers):
            work.put(None)
        allocations_queue, report_queue = ctx.Queue(), ctx.Queue()
        done = ctx.Value(ctypes.c_uint64, 0)
        allocator = _page_allocator(MemoryAllocator)(str(tmp), writer.data_region_start, writer.page_size)
        args = (work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, allocations_queue,
                source, report_queue, options.max_resolution, options.skip_corrupt, len(source.classes), options.mode)
        processes = [ctx.Process(target=_worker_job, args=args, daemon=True) for _ in range(workers)]
        for p in processes:
            p.start()

        skipped: list[SkippedSample] = []
        total = WriteStats(len(source.classes))
        n_stats = 0

        def drain(block: bool) -> None:
            nonlocal n_stats
            try:
                while True:
                    msg = report_queue.get(timeout=0.05) if block else report_queue.get_nowait()
                    block = False
                    if msg[0] == "error":
                        _, i, where, reason = msg
                        raise DatasetFileError(f"{where} (sample {i} of {source.split}): {reason}")
                    if msg[0] == "skip":
                        skipped.append(SkippedSample(msg[1], msg[2], msg[3]))
                    else:
                        total.merge(msg[1])
                        n_stats += 1
            except queue.Empty:
                pass

        def check_alive() -> None:
            for p in processes:
                if p.exitcode not in (None, 0):
                    drain(block=True)  # a reported error explains the death better than the exit code
                    raise DatasetFileError(f"{tmp.parent}: writer process {p.pid} died (exit code {p.exitcode}) "
                                           f"while converting {source.name}/{source.split}")

        bar = tqdm(total=n, unit="img", unit_scale=True, desc=desc, disable=not options.progress, file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.1)
        try:
            previous = 0
            while previous != n:
                drain(block=False)
                check_alive()
                value = done.value
                if value > previous:
                    bar.update(value - previous)
                    previous = value
                time.sleep(0.05)
        finally:
            bar.close()
        allocation_list: list = []
        received = 0
        while received < workers or n_stats < workers:
            try:
                allocation_list.extend(allocations_queue.get(timeout=0.05))
                received += 1
            except queue.Empty:
                pass
            drain(block=False)
            if received < workers or n_stats < workers:
                check_alive()
        for p in processes:
            p.join()
        writer.finalize(allocation_list)
        ok = True
        return total, sorted(skipped, key=lambda s: s.index)
    finally:
        if not ok:
            for p in processes:
                if p.is_alive():
                    p.terminate()
            for p in processes:
                p.join()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


@dataclass
class StagedBeton:
    """A finished .beton in its temporary file, and its sidecar, waiting for `commit()` (rename) or `discard()`."""
    tmp: Path
    path: Path
    meta: dict
    skipped: list = field(default_factory=list)

    @property
    def sidecar_tmp(self) -> Path:
        return temp_path(sidecar_path(self.path))

    def commit(self) -> dict:
        return commit_all([self])[0]

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)
        self.sidecar_tmp.unlink(missing_ok=True)


def commit_all(staged: list[StagedBeton]) -> list[dict]:
    """Rename every staged .beton and its sidecar to their final paths, or none of them; -> their sidecars.

    Files already at the final paths (an overwrite) are first renamed aside; if any rename fails, what was placed
    is removed and the old files go back, so the folder holds all the old splits or all the new ones. A .beton at
    its final path always has its sidecar beside it.
    """
    aside: list[tuple[Path, Path]] = []     # (backup, final path)
    placed: list[Path] = []
    try:
        for s in staged:
            with open(s.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            with open(s.sidecar_tmp, "w") as fh:
                fh.write(json.dumps(s.meta, indent=2) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        for s in staged:
            for final in (s.path, sidecar_path(s.path)):
                if final.is_file():
                    backup = backup_path(final)
                    os.replace(final, backup)
                    aside.append((backup, final))
        for s in staged:
            for tmp, final in ((s.sidecar_tmp, sidecar_path(s.path)), (s.tmp, s.path)):
                os.replace(tmp, final)
                placed.append(final)
    except BaseException:
        for final in reversed(placed):
            final.unlink(missing_ok=True)
        for backup, final in reversed(aside):
            try:
                os.replace(backup, final)
            except OSError:   # left as the hidden backup: the next conversion of this folder puts it back
                pass
        for s in staged:
            s.discard()
        raise
    for backup, _ in aside:
        backup.unlink(missing_ok=True)
    for folder in {s.path.parent for s in staged}:
        fsync_dir(folder)
    return [s.meta for s in staged]


def backup_path(path: Path) -> Path:
    """Where an overwritten file waits while `commit_all` renames the new ones in."""
    return path.with_name(f".{path.name}.old-{os.getpid()}")


def check_target(path: Path, force: bool) -> None:
    """Refuse before any work: `path` or its sidecar path is a folder (or another non-file), or `path` exists
    and force is False. Raises FileExistsError."""
    for target in (path, sidecar_path(path)):
        if (target.exists() or target.is_symlink()) and not target.is_file():
            raise FileExistsError(f"{target} exists and is not a file (remove it or choose another --out)")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (pass --force to overwrite)")


def stage_beton(source: ImageSource, path: str | os.PathLike, options: WriteOptions | None = None,
                desc: str | None = None) -> StagedBeton:
    """Write `source` to a temporary file beside `path`; nothing appears at `path` until `.commit()`.

    Raises FileExistsError when `path` exists and options.force is False, DatasetFileError for bad data (naming
    the file and sample index); the temporary file is removed on any exception, Ctrl-C included.
    """
    options = options or WriteOptions()
    if options.mode not in ("raw", "jpg"):
        raise ValueError(f"image mode must be 'raw' or 'jpg', got {options.mode!r}")
    if not 1 <= int(options.jpeg_quality) <= 100:
        raise ValueError(f"jpeg quality must be in 1..100, got {options.jpeg_quality}")
    path = Path(path)
    check_target(path, options.force)
    origin = getattr(source, "origin", "") or source.name
    if len(source) == 0:
        raise DatasetFileError(f"{origin}: no images found for split '{source.split}'")
    if not source.classes:
        raise DatasetFileError(f"{origin}: no classes")
    labels = getattr(source, "labels", None)
    if labels is not None:
        check_labels(np.asarray(labels), len(source.classes), source)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)

    t0 = time.perf_counter()
    tmp = temp_path(path)
    workers = options.num_workers if options.num_workers > 0 else (os.cpu_count() or 1)
    desc = desc or f"{source.name}/{source.split}"
    try:
        indices = np.arange(len(source))
        stats, skipped = _run_ffcv(source, tmp, indices, options, workers, desc)
        if skipped:
            keep = np.setdiff1d(indices, [s.index for s in skipped])
            if len(keep) == 0:
                raise DatasetFileError(f"{origin}: every sample of split '{source.split}' failed to decode "
                                       f"(first: {skipped[0].where}: {skipped[0].reason})")
            tmp.unlink()
            # The first pass wrote placeholders for the skipped samples; write again without them.
            stats, again = _run_ffcv(source, tmp, keep, replace_skip(options), workers, desc + " (again)")
        # FFCV's page layout follows its workers' timing: lay the pages out as one worker would
        laid_out = path.with_name(f".{path.name}.layout-{os.getpid()}")
        try:
            single_writer_layout(tmp, laid_out)
            os.replace(laid_out, tmp)
        finally:
            laid_out.unlink(missing_ok=True)
        meta = sidecar_meta(dataset=source.name, split=source.split, classes=source.classes, stats=stats,
                            mode=options.mode, jpeg_quality=options.jpeg_quality if options.mode == "jpg" else None,
                            max_resolution=options.max_resolution, beton=tmp, seconds=time.perf_counter() - t0,
                            source={"path": str(origin), "sha256": source.source_checksum(),
                                    **getattr(source, "source_info", {})},
                            skipped=[s.as_dict() for s in skipped])
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StagedBeton(tmp, path, meta, skipped)


def replace_skip(options: WriteOptions) -> WriteOptions:
    """The options for the second pass after skipping: a sample failing now is an error (the input changed)."""
    from dataclasses import replace

    return replace(options, skip_corrupt=False)


def write_beton(source: ImageSource, path: str | os.PathLike, options: WriteOptions | None = None) -> dict:
    """Write `source` to `path` (.beton) and its sidecar; return the sidecar dict.

    Raises FileExistsError when `path` exists and options.force is False, DatasetFileError for bad data.
    """
    return stage_beton(source, path, options).commit()


def _remove_stale_temporaries(path: Path) -> None:
    """Clean up after an earlier, killed conversion of `path`: its temporaries are removed; a file it had renamed
    aside goes back where its final path is empty, and is removed where a new file took that place."""
    for final in (path, sidecar_path(path)):
        for stale in path.parent.glob(f".{final.name}.*-*"):
            kind, _, pid = stale.name[len(final.name) + 2:].rpartition("-")
            if kind not in ("tmp", "old", "layout") or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not final.exists():
                os.replace(stale, final)
            else:
                stale.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
