"""`smallvit inspect PATH`: a .beton goes to loaders.inspect; a run or checkpoint folder is described here."""
from __future__ import annotations

import sys
from pathlib import Path

from engine import checkpoint


def describe_checkpoint(folder: Path) -> list[str]:
    state = checkpoint.read_state(folder)
    lines = [f"checkpoint {folder}"]
    lines += [f"  {k}: {v}" for k, v in state.items() if k not in ("config", "teacher")]
    shapes = checkpoint.export_shapes(folder / checkpoint.EXPORT_FILE)
    numel = sum(_prod(shape) for shape in shapes.values())
    lines.append(f"  weights: {len(shapes)} tensors, {numel:,} parameters ({checkpoint.EXPORT_FILE})")
    ds_files = sorted(p.name for p in (folder / "ds").iterdir())
    lines.append(f"  deepspeed files: {', '.join(ds_files)}")
    return lines


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def inspect_path(args) -> int:
    path = Path(args.path)
    if path.is_file():
        from loaders.inspect import run_inspect

        return run_inspect(args)
    try:
        folder = checkpoint.find(path)
        checkpoint.verify(folder)   # every file, DeepSpeed's too: a damaged one is named here, not at a resume
        print("\n".join(describe_checkpoint(folder)))
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"smallvit: error: {exc}", file=sys.stderr)
        return 2
    return 0
