"""Bench outputs: a table on the terminal, a JSON file with the environment, a markdown line per figure in
bench/results/README.md, and a bar chart PNG."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TABLE_HEADER = ("| date | device | bench | variant | figure | command |\n"
                "|---|---|---|---|---|---|\n")


def environment() -> dict[str, Any]:
    """The run environment (versions, GPU, commit; engine.run_log) plus what a bench reader also wants."""
    from engine.run_log import environment as run_environment

    env = {**run_environment(), "platform": platform.platform(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else f"cpu ({platform.processor() or platform.machine()})"}
    for name in ("ffcv", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # not installed here
            env[name] = None
    return env


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Format rows as an aligned text table (and return it)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3f}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


def write_results(bench: str, rows: list[dict[str, Any]], figure_key: str, label_key: str, unit: str,
                  out_dir: Path | None = None, command: str | None = None, record: bool = True,
                  extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write <bench>_<device>.json and .png under out_dir (bench/results by default) and, when `record`, add one
    markdown line per row to out_dir/README.md. Returns the paths written."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    device_tag = "gpu" if torch.cuda.is_available() else "cpu"
    if command is None:
        command = " ".join(["python -m bench", *sys.argv[1:]])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    payload = {"bench": bench, "date": stamp, "command": command, "environment": env, "unit": unit,
               "rows": rows, **(extra or {})}
    json_path = out_dir / f"{bench}_{device_tag}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    png_path = out_dir / f"{bench}_{device_tag}.png"
    bar_chart(rows, figure_key, label_key, unit, f"{bench} on {env['device']}", png_path)
    if record:
        record_lines(out_dir, bench, [(str(r[label_key]), f"{r[figure_key]:,.1f} {unit}") for r in rows], command,
                     stamp, env["device"])
    return {"json": json_path, "png": png_path}


def record_lines(out_dir: Path, bench: str, figures: list[tuple[str, str]], command: str, stamp: str | None = None,
                 device: str | None = None) -> Path:
    """Append one line per (variant, figure) to out_dir/README.md, the table of recorded figures."""
    md = Path(out_dir) / "README.md"
    if not md.exists():
        md.write_text("# Recorded benchmark figures\n\nEvery figure with the command that produced it "
                      "(JSON beside this file holds the full environment).\n\n" + TABLE_HEADER)
    stamp = stamp or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    device = device or environment()["device"]
    with open(md, "a") as fh:
        for variant, figure in figures:
            fh.write(f"| {stamp} | {device} | {bench} | {variant} | {figure} | `{command}` |\n")
    return md


def bar_chart(rows: list[dict[str, Any]], figure_key: str, label_key: str, unit: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r[label_key]) for r in rows]
    values = [float(r[figure_key]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
    ax.barh(labels, values, color="#4878a8")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.0f}" if v >= 10 else f" {v:.3g}", va="center", fontsize=8)
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
