"""Time one drloc step (pair sampling + targets, gather, pairwise head, loss, backward to tokens and head weights)
per implementation, on the CIFAR ViT shapes by default (k = 8, C = 192, m = 64, H = 512):

    python -m bench.heads [--device cpu|cuda] [--batch 1024] [--mode l1|ce|cbr] [--out-json F]
    python -m bench.heads --full-step [--compile-model] ...   # the model's training step +- drloc: overhead %

Variants: eager      = engine.tasks.drloc as it runs today (torch.randint pairs, DrlocHead on gathered pairs,
                       kernels.drloc_reference loss) — the reference pipeline;
          compile    = the same step under torch.compile;
          fused_torch = kernels.drloc_head.FusedPairLoss with its PyTorch ops (project once, gather-add);
          triton     = kernels.dispatch with backend='triton' (CUDA only; the CPU interpreter is not a speed path).
Each variant: warm-up steps, then `--repeats` timings of `--steps` steps, variants interleaved round-robin; the
table gives the median ms per step and the spread (min, max over repeats). Results go to
bench/results/{heads|full_step}_<device>.json (or --out-json), a bar chart .png beside it, and one markdown line per
variant in the README.md of that folder (not with --no-record).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench.report import bar_chart, record_lines
from engine.models import create_model
from engine.tasks.drloc import DrlocHead
from kernels import dispatch
from kernels import drloc_reference as ref
from kernels.drloc_head import TorchPairOps, fused_pair_loss

RESULTS = Path(__file__).resolve().parent / "results"


def _reference_loss(head: DrlocHead, mode: str, tokens: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """DrlocTask.targets + head + loss, as engine/tasks/drloc.py composes them."""
    p_i, p_j = ref.sample_pair_positions(tokens.shape[0], k, m, device=tokens.device)
    target = ref.pair_offset_targets(p_i, p_j, k, use_abs=True)
    pred = head(ref.gather_pairs(tokens, p_i, p_j))
    if mode == "l1":
        return ref.l1_loss(pred[0], target)
    return (ref.ce_loss if mode == "ce" else ref.cbr_loss)(pred[0], pred[1], target)


def build_steps(head: DrlocHead, mode: str, k: int, m: int, device: torch.device
                ) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    """name -> step(tokens, seed) returning the loss (backward is run by the timer)."""
    steps: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "eager": lambda tokens, seed: _reference_loss(head, mode, tokens, k, m),
        "compile": torch.compile(lambda tokens, seed: _reference_loss(head, mode, tokens, k, m)),
    }
    params = dispatch.HeadParams.from_module(head)

    def fused(ops):
        def step(tokens, seed):
            p_i, p_j, target = ref.counter_pairs_and_targets(tokens.shape[0], k, m, True, seed, device,
                                                             mode == "l1")
            return fused_pair_loss(tokens, p_i, p_j, target, params.w1, params.b1, params.w2, params.b2,
                                   list(params.out), mode, ops=ops, shared=params.shared)
        return step

    steps["fused_torch"] = fused(TorchPairOps)
    if device.type == "cuda":
        def triton_step(tokens, seed):
            p_i, p_j, target = dispatch.drloc_pairs_and_targets(tokens.shape[0], k, m, True, seed, device,
                                                                "triton", mode == "l1")
            return dispatch.drloc_pair_loss(tokens, p_i, p_j, target, params, mode, "triton")
        steps["triton"] = triton_step
    return steps


class StepTimer:
    """Runs one variant's step (forward + backward, gradients cleared between steps) and times batches of steps.
    loss_of(seed) builds the loss; `clear` holds the modules and leaf tensors whose gradients are reset."""

    def __init__(self, loss_of: Callable[[int], torch.Tensor], clear: list, device: torch.device,
                 autocast_dtype: torch.dtype | None):
        self.loss_of, self.clear, self.device, self.autocast_dtype = loss_of, clear, device, autocast_dtype
        self.seed = 0
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one(self) -> None:
        self.seed += 1
        for item in self.clear:
            if isinstance(item, torch.nn.Module):
                item.zero_grad(set_to_none=True)
            else:
                item.grad = None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = self.loss_of(self.seed)
        loss.backward()

    def ms_per_step(self, steps: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.one()
        self.sync()
        return (time.perf_counter() - start) * 1e3 / steps


def time_variants(timers: dict[str, StepTimer], steps: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Warm every variant up (compiles, autotunes), then time them round-robin, so that load on a shared machine
    drifting over the run spreads over all variants instead of biasing the one that ran during it."""
    for timer in timers.values():
        for _ in range(warmup):
            timer.one()
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            times[name].append(timer.ms_per_step(steps))
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None,
                    help="images per step (default 1024 on CUDA; 256 on the CPU, to stay quick)")
    ap.add_argument("--grid", type=int, default=8, help="k: the patch grid side (CIFAR ViT: 32/4 = 8)")
    ap.add_argument("--dim", type=int, default=192, help="C: token channels")
    ap.add_argument("--pairs", type=int, default=64, help="m: pairs per image")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--mode", choices=["l1", "ce", "cbr"], default="l1")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="bf16 = autocast (default on CUDA); fp32 default on CPU")
    ap.add_argument("--steps", type=int, default=None, help="steps per repeat (default 20 CUDA, 3 CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="", help="comma list to run a subset (eager,compile,fused_torch,triton)")
    ap.add_argument("--full-step", action="store_true",
                    help="time the model's training forward+backward without drloc and with each variant")
    ap.add_argument("--model", default="vit_cifar", help="registered model for --full-step")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--compile-model", action="store_true", help="--full-step: torch.compile the model")
    ap.add_argument("--out-json", default="", help="JSON path (default bench/results/{heads|full_step}_<device>.json)")
    ap.add_argument("--no-record", action="store_true", help="do not add lines to the results README table")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    steps_per_repeat = args.steps or (20 if device.type == "cuda" else 3)
    args.batch = args.batch or (1024 if device.type == "cuda" else 256)
    torch.manual_seed(0)
    k, n_tok = args.grid, args.grid ** 2
    head = DrlocHead(args.dim, k, mode=args.mode, use_abs=True, hidden=args.hidden).to(device)
    tokens = torch.randn(args.batch, 1 + n_tok, args.dim, device=device, requires_grad=True)
    variants = build_steps(head, args.mode, k, args.pairs, device)
    if args.variants:
        wanted = args.variants.split(",")
        unknown = set(wanted) - set(variants)
        if unknown:
            raise SystemExit(f"--variants: unknown or unavailable on {device}: {sorted(unknown)}")
        variants = {name: variants[name] for name in wanted}

    if args.full_step:
        # the whole training forward/backward of the model, without drloc and with each drloc variant
        model = create_model(args.model).to(device)
        forward = torch.compile(model.forward_with_tokens) if args.compile_model else model.forward_with_tokens
        images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
        labels = torch.randint(0, 10, (args.batch,), device=device)

        def full(step):
            def loss_of(seed):
                out = forward(images)
                loss = F.cross_entropy(out.logits, labels)
                return loss if step is None else loss + 0.1 * step(out.patch_tokens, seed)
            return loss_of
        timers = {"no_drloc": StepTimer(full(None), [model, head], device, autocast_dtype)}
        timers.update({name: StepTimer(full(step), [model, head], device, autocast_dtype)
                       for name, step in variants.items()})
        base_name, title = "no_drloc", f"training fwd+bwd of {args.model}{' (compiled)' if args.compile_model else ''}"
    else:
        timers = {name: StepTimer(lambda seed, step=step: step(tokens[:, 1:], seed), [tokens, head], device,
                                  autocast_dtype) for name, step in variants.items()}
        base_name, title = "eager", "drloc step fwd+bwd"
    rows = {}
    for name, times in time_variants(timers, steps_per_repeat, args.repeats, args.warmup).items():
        rows[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                      "repeats_ms": times}
    base = rows.get(base_name)
    print(f"{title}, {device} {precision}, B={args.batch} k={k} C={args.dim} m={args.pairs} "
          f"H={args.hidden} mode={args.mode}; median of {args.repeats} x {steps_per_repeat} steps")
    # relative figures from the medians and from the minima (the minimum is the steadier estimate on a shared,
    # loaded machine: contention only ever adds time)
    last = "overhead" if args.full_step else "vs eager"
    print(f"{'variant':<12} {'median ms':>10} {'min ms':>9} {'max ms':>9} {last + ' (med)':>15} {last + ' (min)':>15}")
    for name, r in rows.items():
        rel = {}
        for stat in ("median_ms", "min_ms"):
            if not base:
                rel[stat] = "-"
            elif args.full_step:
                rel[stat] = f"{100 * (r[stat] / base[stat] - 1):+.1f}%"
            else:
                rel[stat] = f"{base[stat] / r[stat]:.2f}x"
        r["relative_median"], r["relative_min"] = rel["median_ms"], rel["min_ms"]
        print(f"{name:<12} {r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {r['max_ms']:>9.3f} "
              f"{rel['median_ms']:>15} {rel['min_ms']:>15}")

    report = {
        "bench": "drloc_full_step" if args.full_step else "drloc_head_step",
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "config": {"batch": args.batch, "grid": k, "dim": args.dim, "pairs": args.pairs, "hidden": args.hidden,
                   "mode": args.mode, "precision": precision, "steps": steps_per_repeat,
                   "repeats": args.repeats, "warmup": args.warmup, "full_step": args.full_step,
                   "model": args.model if args.full_step else None, "compile_model": args.compile_model},
        "results": rows,
    }
    out = Path(args.out_json) if args.out_json else RESULTS / (
        f"{'full_step' if args.full_step else 'heads'}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    chart_rows = [{"variant": name, "median_ms": r["median_ms"]} for name, r in rows.items()]
    bar_chart(chart_rows, "median_ms", "variant", "ms per step (median)",
              f"{title}, B={args.batch}, {report['device']} {precision}", out.with_suffix(".png"))
    if not args.no_record:
        command = " ".join(["python -m bench heads", *(sys.argv[1:] if argv is None else argv)])
        record_lines(out.parent, "full_step" if args.full_step else "heads",
                     [(f"{name} B={args.batch} {precision}" + (f" ({r['relative_median']})" if base else ""),
                       f"{r['median_ms']:,.3f} ms/step") for name, r in rows.items()], command)
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return report


if __name__ == "__main__":
    main()
