"""`python -m bench loaders|heads|train|convert|ssl|gpu-check|all [options]` (also `smallvit bench ...`).

Each bench measures its competing variants side by side in one process and one run, prints a table, and writes a
JSON (with the environment), a bar chart PNG and a markdown line per figure in bench/results/.
"""
from __future__ import annotations

import sys

BENCHES = {
    "loaders": "bench.loaders",        # torchvision reference vs ffcv / dali / resident, with and without the recipe
    "heads": "bench.heads",            # drloc head fwd+bwd: eager vs torch.compile vs Triton
    "train": "bench.train",            # end-to-end step vs model-only ceiling vs the reference pipeline
    "convert": "bench.convert_speed",  # .beton conversion speed, raw vs JPEG
    "ssl": "bench.ssl",                # DINO pretraining: k-NN vs random init; fine-tune vs scratch (accuracy)
    "gpu-check": "bench.gpu_check",    # every GPU stage in one call, from the GPU bundle (also bench/gpu_check.sh)
}
NOT_IN_ALL = ("ssl", "gpu-check")      # ssl trains; gpu-check installs a bundle and runs the others itself


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*BENCHES, "all"):
        print(__doc__)
        for name, module in BENCHES.items():
            print(f"  {name:8s} {module}   (python -m bench {name} --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    names = [n for n in BENCHES if n not in NOT_IN_ALL] if argv[0] == "all" else [argv[0]]
    rc = 0
    for name in names:
        print(f"== bench {name}")
        result = importlib.import_module(BENCHES[name]).main(argv[1:] if argv[0] != "all" else [])
        rc = rc or (result if isinstance(result, int) else 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
