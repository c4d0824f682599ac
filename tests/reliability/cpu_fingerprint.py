"""Which CPU numerics a run had, and the golden-value check that depends on it.

CPU float results can differ in the last bits between machines of the same kind: torch, MKL and oneDNN pick
their kernels (and with them the order of a sum) by instruction set, vendor and cache size. A committed golden
value is therefore exact only on a machine whose fingerprint was recorded with it; on any other machine it is
checked to a tight relative tolerance, and the message names both fingerprints.

A golden file holds one recording per fingerprint seen (`recordings`, keyed by `fingerprint_key`), each with its
`cpu` fingerprint and its values; `make_fixtures.py` adds this machine's recording without touching the others.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

# Instruction-set flags that change which math kernel runs (and so the bits of a float result).
ISA_FLAGS = ("sse4_2", "fma", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")

# Off-machine drift of the tiny 100-step run, measured: the AVX-512 machine of 2026-12-02 against the first
# recording, 17 of 100 losses differ, by at most 1.7e-7 relative (1-2 float32 ulps). 1e-5 is ~60x that, while
# any real numerical change moves the losses by 1e-4 or more within a few steps.
RTOL = 1e-5


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where the file does not exist)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_fingerprint() -> dict:
    """What decides the bits of a CPU float result here: torch build, its kernel dispatch, CPU vendor, model,
    cache size and the math-relevant instruction-set flags."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "vendor": info.get("vendor_id", ""),
        "model": info.get("model name", platform.processor()),
        "cache": info.get("cache size", ""),
        "isa": [f for f in ISA_FLAGS if f in flags],
    }


def fingerprint_key(fp: dict) -> str:
    """A short stable name for a fingerprint: 12 hex digits of its JSON's SHA-256."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def describe(fp: dict) -> str:
    if "unrecorded" in fp:
        return fp["unrecorded"]
    return (f"{fp.get('vendor')} {fp.get('model')!r}, cache {fp.get('cache')}, torch {fp.get('torch')} "
            f"({fp.get('capability')}), isa {'+'.join(fp.get('isa', []))}")


def check_golden(got: dict[int, float], recordings: dict[str, dict], steps, what: str) -> None:
    """Assert that `got[step]` matches the golden values at every step: bitwise when this machine's fingerprint
    has a recording, else within RTOL of each recording's values (any one suffices), naming the fingerprints.

    `recordings`: fingerprint key -> {"cpu": fingerprint, "values": {step: float}} (steps as ints)."""
    steps = list(steps)
    missing = [s for s in steps if s not in got]
    assert not missing, f"{what}: steps {missing[:5]}... were not logged"
    here = cpu_fingerprint()
    key = fingerprint_key(here)
    if key in recordings:
        expected = recordings[key]["values"]
        diff = [(s, got[s], expected[s]) for s in steps if got[s] != expected[s]]
        assert not diff, (f"{what}: {len(diff)} of {len(steps)} values differ bitwise from the recording of this "
                          f"CPU (fingerprint {key}: {describe(here)}); first: {diff[:3]}")
        return
    failures = []
    for other, rec in recordings.items():
        expected = rec["values"]
        worst = max(steps, key=lambda s: abs(got[s] - expected[s]) / abs(expected[s]))
        rel = abs(got[worst] - expected[worst]) / abs(expected[worst])
        if rel <= RTOL:
            return
        failures.append(f"recorded on {other} ({describe(rec['cpu'])}): worst step {worst}, {got[worst]!r} vs "
                        f"{expected[worst]!r}, relative {rel:.2e}")
    raise AssertionError(
        f"{what}: not within relative {RTOL:g} of any recording. This CPU's fingerprint {key} ({describe(here)}) "
        f"has none of its own, so only the tolerance applies; " + "; ".join(failures))


def load_recordings(path: Path) -> dict[str, dict]:
    """A golden file's recordings with integer steps."""
    data = json.loads(path.read_text())
    return {k: {"cpu": r["cpu"], "values": {int(s): v for s, v in r["values"].items()}}
            for k, r in data["recordings"].items()}


def add_recording(data: dict, values: dict[int, float]) -> dict:
    """`data` (a golden file's JSON) with this machine's recording set to `values`; other recordings kept."""
    fp = cpu_fingerprint()
    data.setdefault("recordings", {})[fingerprint_key(fp)] = {
        "cpu": fp, "values": {str(s): values[s] for s in sorted(values)}}
    return data
