"""`smallvit inspect FILE.beton [--verify]`: what a .beton holds, checked against its sidecar.

Prints the fields, the sample count, the image mode and sizes and the class histogram (labels read from the file,
names from the sidecar). --verify decodes every image with a plain per-sample reader (FFCV's own file layout, no
compiled pipeline: an independent check of the writer), with a progress bar, and checks count, labels, sizes,
channel mean/std and the whole file's SHA-256 against the sidecar.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from loaders.convert.writer import WriteStats
from loaders.sidecar import DatasetFileError, read_sidecar

EXIT_BAD_INPUT = 2
EXIT_VERIFY_FAILED = 1


def add_inspect_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("path", metavar="FILE", help="a .beton file (its sidecar FILE.json beside it)")
    parser.add_argument("--verify", action="store_true",
                        help="decode every image and check count, labels and sizes against the sidecar")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar for --verify")
    return parser


class BetonFile:
    """The header, field table, per-sample metadata and allocation table of a .beton (FFCV's reader)."""

    def __init__(self, path: str | Path):
        from ffcv.reader import Reader

        self.path = Path(path)
        try:
            self.reader = Reader(str(self.path))
        except Exception as exc:  # noqa: BLE001 - FFCV raises assorted errors on a damaged header
            raise DatasetFileError(f"{self.path}: not a readable .beton ({type(exc).__name__}: {exc})") from None
        self.fields = {name: type(h).__name__ for name, h in self.reader.handlers.items()}
        self.num_samples = int(self.reader.num_samples)
        names = self.reader.field_names
        if "image" not in names or "label" not in names:
            raise DatasetFileError(f"{self.path}: expected fields 'image' and 'label', has {names}")
        self._image = self.reader.metadata[f"f{names.index('image')}"]
        self.labels = np.asarray(self.reader.metadata[f"f{names.index('label')}"], dtype=np.int64)
        table = self.reader.alloc_table
        order = np.argsort(table["ptr"])
        self._ptrs, self._sizes = table["ptr"][order], table["size"][order]

    @property
    def heights(self) -> np.ndarray:
        return np.asarray(self._image["height"], dtype=np.int64)

    @property
    def widths(self) -> np.ndarray:
        return np.asarray(self._image["width"], dtype=np.int64)

    @property
    def modes(self) -> np.ndarray:
        """Per sample: 0 JPEG, 1 raw pixels (FFCV's IMAGE_MODES)."""
        return np.asarray(self._image["mode"], dtype=np.int64)

    def images(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index, uint8 (H, W, 3) RGB) for every sample, in file order, decoded one at a time."""
        import cv2

        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        for i in range(self.num_samples):
            ptr = int(self._image["data_ptr"][i])
            k = int(np.searchsorted(self._ptrs, ptr))
            if k >= len(self._ptrs) or int(self._ptrs[k]) != ptr:
                raise DatasetFileError(f"{self.path}: sample {i} points at byte {ptr}, which no allocation holds")
            blob = np.asarray(data[ptr:ptr + int(self._sizes[k])])
            h, w = int(self._image["height"][i]), int(self._image["width"][i])
            if self._image["mode"][i] == 1:
                if blob.size != h * w * 3:
                    raise DatasetFileError(f"{self.path}: sample {i} holds {blob.size} bytes, not {h}x{w}x3")
                yield i, blob.reshape(h, w, 3)
            else:
                bgr = cv2.imdecode(blob, cv2.IMREAD_COLOR)
                if bgr is None or bgr.shape[:2] != (h, w):
                    raise DatasetFileError(f"{self.path}: sample {i}: its JPEG does not decode to {h}x{w}")
                yield i, bgr[:, :, ::-1]


def describe(path: Path, beton: BetonFile, meta: Optional[dict]) -> list[str]:
    lines = [f"{path}: {beton.num_samples} samples, {path.stat().st_size / 1e6:.1f} MB",
             "  fields: " + ", ".join(f"{k} ({v})" for k, v in beton.fields.items())]
    modes = {0: "jpg", 1: "raw"}
    present = sorted({modes.get(int(m), str(m)) for m in np.unique(beton.modes)}) if beton.num_samples else []
    hs, ws = beton.heights, beton.widths
    if beton.num_samples:
        sizes = f"{hs.min()}x{ws.min()}" if (hs.min(), ws.min()) == (hs.max(), ws.max()) else \
            f"{hs.min()}x{ws.min()} .. {hs.max()}x{ws.max()}"
        lines.append(f"  images: {'/'.join(present)}, {sizes} (height x width)")
    if meta:
        lines.append(f"  sidecar: dataset {meta['dataset']}, split {meta['split']}, {meta['num_classes']} classes, "
                     f"mean {' '.join(f'{v:.4f}' for v in meta['mean'])}, "
                     f"std {' '.join(f'{v:.4f}' for v in meta['std'])}")
        source = meta.get("source", {})
        if source:
            lines.append(f"  source: {source.get('path', '?')} (sha256 {str(source.get('sha256', '?'))[:16]}...)")
        if meta.get("skipped"):
            lines.append(f"  skipped at conversion: {len(meta['skipped'])} image(s)")
    classes = meta["classes"] if meta else []
    n = max(len(classes), int(beton.labels.max()) + 1 if beton.num_samples else 0)
    counts = np.bincount(beton.labels[beton.labels >= 0], minlength=n) if beton.num_samples else np.zeros(0, int)
    lines.append(f"  class histogram ({n} classes):")
    width = max((len(c) for c in classes), default=4)
    peak = max(int(counts.max()), 1) if len(counts) else 1
    for k, count in enumerate(counts):
        name = classes[k] if k < len(classes) else f"<{k}>"
        lines.append(f"    {k:>4} {name:<{width}} {int(count):>8}  {'#' * int(round(30 * count / peak))}")
    return lines


def verify(path: Path, beton: BetonFile, meta: dict, progress: bool = True) -> list[str]:
    """Decode every image (a progress bar on stderr unless progress=False); -> problems (empty when the file
    matches its sidecar)."""
    from tqdm import tqdm

    from loaders.convert.trees import file_sha256

    problems = []
    if beton.num_samples != meta["num_images"]:
        problems.append(f"{path}: holds {beton.num_samples} samples, the sidecar says {meta['num_images']}")
    bad = np.nonzero((beton.labels < 0) | (beton.labels >= meta["num_classes"]))[0]
    if len(bad):
        problems.append(f"{path}: sample {int(bad[0])} has label {int(beton.labels[bad[0]])}, outside "
                        f"0..{meta['num_classes'] - 1} ({len(bad)} such samples)")
    counts = np.bincount(beton.labels[beton.labels >= 0], minlength=meta["num_classes"])[:meta["num_classes"]]
    if counts.tolist() != list(meta["class_counts"]):
        problems.append(f"{path}: class counts {counts.tolist()} differ from the sidecar's {meta['class_counts']}")
    want_h, want_w = meta["image"].get("height"), meta["image"].get("width")
    stats = WriteStats(max(meta["num_classes"], 1))
    decoded = 0
    bar = tqdm(beton.images(), total=beton.num_samples, unit="img", unit_scale=True, desc=f"verify {path.name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for i, image in bar:
            decoded += 1
            stats.add(image, 0)
            if want_h and image.shape[:2] != (want_h, want_w):
                problems.append(f"{path}: sample {i} is {image.shape[0]}x{image.shape[1]}, the sidecar says "
                                f"{want_h}x{want_w}")
                break
    except DatasetFileError as exc:
        problems.append(str(exc))
    finally:
        bar.close()
    if not problems and decoded != beton.num_samples:
        problems.append(f"{path}: decoded {decoded} of {beton.num_samples} samples")
    if not problems:
        # Raw pixels are what the writer measured: exact. JPEG: the sidecar describes the pixels before encoding.
        tolerance = 1e-6 if meta["image"]["mode"] == "raw" else 0.01
        mean, std = stats.mean_std()
        for what, got, want in (("mean", mean, meta["mean"]), ("std", std, meta["std"])):
            if max(abs(a - b) for a, b in zip(got, want)) > tolerance:
                problems.append(f"{path}: decoded channel {what} {[round(v, 4) for v in got]} differs from the "
                                f"sidecar's {[round(v, 4) for v in want]}")
    if meta.get("sha256") and file_sha256(path) != meta["sha256"]:   # sidecars before this check have none
        problems.append(f"{path}: its SHA-256 differs from the sidecar's (the file changed after conversion)")
    return problems


def run_inspect(args: argparse.Namespace) -> int:
    """-> 0 (verified or just described), 1 when --verify found a mismatch, 2 for an unusable file."""
    path = Path(args.path)
    if path.suffix != ".beton":
        print(f"smallvit: error: {path}: not a .beton file", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if not path.is_file():
            raise DatasetFileError(f"{path}: no such file")
        beton = BetonFile(path)
        try:
            meta = read_sidecar(path)
        except DatasetFileError as exc:
            if args.verify:
                raise
            print(f"warning: {exc}", file=sys.stderr)
            meta = None
        for line in describe(path, beton, meta):
            print(line)
        if args.verify:
            problems = verify(path, beton, meta, progress=not getattr(args, "no_progress", False))
            if problems:
                for p in problems:
                    print(f"verify FAILED: {p}", file=sys.stderr)
                return EXIT_VERIFY_FAILED
            print(f"verify ok: all {beton.num_samples} images decode; count, labels, sizes, mean/std"
                  f"{' and SHA-256' if meta.get('sha256') else ''} match the sidecar")
        return 0
    except DatasetFileError as exc:
        print(f"smallvit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="smallvit inspect", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=__doc__.splitlines()[0])
    add_inspect_arguments(parser)
    return run_inspect(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
