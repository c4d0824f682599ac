"""bench/heads.py runs end to end on tiny shapes and writes the JSON it promises (CPU variants only: the compile
variant costs a compilation, the Triton one needs CUDA)."""
from __future__ import annotations

import json

from bench import heads


def test_bench_heads_writes_timings(tmp_path):
    out = tmp_path / "heads.json"
    report = heads.main(["--device", "cpu", "--batch", "3", "--grid", "3", "--dim", "5", "--pairs", "4",
                         "--hidden", "8", "--mode", "cbr", "--steps", "1", "--repeats", "2", "--warmup", "1",
                         "--variants", "eager,fused_torch", "--out-json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["config"]["batch"] == 3 and saved["config"]["mode"] == "cbr"
    assert set(saved["results"]) == {"eager", "fused_torch"}
    for row in saved["results"].values():
        assert len(row["repeats_ms"]) == 2 and all(t > 0 for t in row["repeats_ms"])
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    assert saved["results"]["eager"]["relative_median"] == "1.00x"
    assert out.with_suffix(".png").stat().st_size > 0
    lines = [line for line in (tmp_path / "README.md").read_text().splitlines() if " | heads | " in line]
    assert len(lines) == 2 and "eager B=3 fp32 (1.00x)" in lines[0] and "ms/step" in lines[0]
    assert "`python -m bench heads --device cpu --batch 3" in lines[0]


def test_bench_full_step_reports_overhead(tmp_path):
    out = tmp_path / "full.json"
    report = heads.main(["--device", "cpu", "--batch", "2", "--full-step", "--pairs", "4", "--hidden", "8",
                         "--steps", "1", "--repeats", "1", "--warmup", "0", "--variants", "fused_torch",
                         "--out-json", str(out), "--no-record"])
    assert set(report["results"]) == {"no_drloc", "fused_torch"}
    assert out.with_suffix(".png").is_file() and not (tmp_path / "README.md").exists()
    assert report["results"]["no_drloc"]["relative_median"] == "+0.0%"
    assert json.loads(out.read_text())["bench"] == "drloc_full_step"
