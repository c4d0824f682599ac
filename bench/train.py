"""End-to-end training step throughput, side by side in one process:

- model_only:  the ceiling — same model, same batch already on the device, forward + CE + backward + AdamW.
- model_only_graphed (CUDA only): that step captured as one CUDA graph and replayed (PyTorch's whole-network
               recipe, fused capturable AdamW): the graphed ceiling.
- ours:        resident loader with the recipe's augmentation (crop, flip, AutoAugment, mixup/cutmix, erasing,
               translation transform) + model + drloc + translation perceptibility + AdamW (plain PyTorch step).
- ours_deepspeed: the same step through DeepSpeed's engine, run by the loop's own step code
               (engine/supervised_step.py: what `smallvit train` runs per step). "ours" is the plain-PyTorch
               step beside it, without DeepSpeed.
- ours_graphed (graphed|emulated): the same step on static buffers (engine/graphed_step.py) with a plain torch
               AdamW: captured and replayed on CUDA; on the CPU it runs eagerly ("emulated", no capture).
- ours_deepspeed_graphed (graphed|emulated): the static step inside DeepSpeed (ZeRO 0, DeepSpeed's engine holding
               module and optimizer, fp32 weights under torch.autocast): what `smallvit train
               engine.graph_step=on` runs. A config the static step cannot run prints its fallback reason instead.
- reference:   the reference repos' pipeline — torchvision DataLoader with PIL transforms, eager model,
               per-image translation loop (torchvision affine), eager drloc head — + AdamW.
- with --ds-configs, DeepSpeed's eager step under each configuration worth comparing for small models:
               "ds zero{0,1} {autocast,ds-bf16} {torch-fused,ds-adam}": ZeRO stage, bf16 by torch.autocast over fp32
               weights or by DeepSpeed's bf16 optimizer (bf16 weights, fp32 master), our torch fused AdamW or the
               AdamW DeepSpeed builds from its config. Combinations this machine cannot run print why.

    python -m bench train [--batch 32,64] [--steps 5] [--images 1024] [--ds-configs]

Images per second: median over repeats of `steps` steps each, after warm-up, with synchronisation on CUDA.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.report import print_table, write_results


def _config(beton: Path, batch: int, device: str):
    from engine.config import config_from_dict

    return config_from_dict({}, [
        f"data.train={beton}", f"data.test={beton}", "data.dataset=random", "data.loader=resident",
        f"data.batch_size={batch}", "data.auto_augment=cifar10", "data.mixup_alpha=1.0", "data.cutmix_alpha=1.0",
        "data.erasing_prob=0.25", "tasks.drloc.enabled=true", "tasks.perceptibility.enabled=true",
        "optim.epochs=300", "optim.warmup_epochs=0", f"engine.device={device}",
        "engine.precision=" + ("bf16" if device == "cuda" else "fp32")])


def _batches(loader):
    """An endless stream of the loader's batches (epoch after epoch)."""
    epoch = 0
    while True:
        for b in loader.epoch(epoch):
            yield b
        epoch += 1


def _rate(step, batch: int, steps: int, repeats: int, device: torch.device, warmup: int = 2) -> dict:
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / steps)
    med = float(np.median(samples))
    return {"images_per_s": batch / med, "step_ms": med * 1e3, "min_ms": min(samples) * 1e3,
            "max_ms": max(samples) * 1e3}


def bench_batch(beton: Path, batch: int, steps: int, repeats: int, device: torch.device, workers: int,
                ds_configs: bool = False) -> list[dict]:
    from engine.models import create_model
    from engine.tasks import batch_transforms, build_tasks
    from engine.train_module import TrainModule
    from engine.weight_decay import param_groups
    from loaders.factory import build_loader

    cfg = _config(beton, batch, device.type)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))
    rows = []

    # model-only ceiling
    model = create_model("vit_cifar", num_classes=10).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def model_only():
        with autocast():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rows.append({"variant": f"model_only b{batch}", **_rate(model_only, batch, steps, repeats, device)})
    if device.type == "cuda":
        rows.append({"variant": f"model_only_graphed b{batch}", "mode": "graphed",
                     **_rate(graphed_model_only(batch, device), batch, steps, repeats, device)})
    else:
        print(f"model_only_graphed b{batch}: not run (capturing a CUDA graph needs a CUDA device)")

    # ours: loader + augmentation + model + drloc + translation (plain PyTorch step)
    loader, meta = build_loader(cfg.data, True, 0, device, label_smoothing=0.1,
                                batch_transforms=batch_transforms(cfg))
    model = create_model("vit_cifar", num_classes=meta["num_classes"]).to(device)
    module = TrainModule(model, build_tasks(cfg, model.embed_dim, model.grid_size), 0.1).to(device)
    opt = torch.optim.AdamW(param_groups(module, 0.05), lr=1e-4, fused=device.type == "cuda")
    stream = _batches(loader)
    counter = iter(range(10**9))

    def ours():
        b = next(stream)
        with autocast():
            loss, _ = module(b, 30.0, next(counter))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rows.append({"variant": f"ours b{batch}", **_rate(ours, batch, steps, repeats, device)})

    # the same through DeepSpeed
    import deepspeed

    from engine.runtime import deepspeed_config, init_runtime

    from engine.precision import compute_dtype
    from engine.supervised_step import SupervisedStep

    rt = init_runtime(device.type)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=deepspeed_config(cfg, rt.world_size))
    # the loop's own default step (engine/supervised_step.py), as train() builds it: bf16 autocast on CUDA,
    # device accumulators read once after the timing, the finite flag skipping on the device with fused AdamW
    ds_step = SupervisedStep(engine, opt, device, compute_dtype(cfg.engine.precision, device),
                             fail_on_nonfinite=cfg.engine.fail_on_nonfinite, zero_stage=cfg.engine.zero_stage,
                             clip=cfg.optim.clip_grad, accumulation_steps=cfg.optim.accumulation_steps,
                             world_size=rt.world_size)
    ds_numbers = iter(range(10**9))

    def refuse_nonfinite(what, value):
        raise RuntimeError(f"ours_deepspeed b{batch}: non-finite {what} {value}")

    def ours_ds():
        ds_step.step(next(stream), 1e-4, next(counter), 30.0, next(ds_numbers), refuse_nonfinite)
    rows.append({"variant": f"ours_deepspeed b{batch}", **_rate(ours_ds, batch, steps, repeats, device)})
    report = ds_step.read()
    ds_step.remove()
    if report.nonfinite or report.steps == 0:
        raise RuntimeError(f"ours_deepspeed b{batch}: {report.nonfinite} non-finite of {report.steps} steps")

    # the static-buffer step (engine/graphed_step.py), plain and inside DeepSpeed, each on a fresh model: DeepSpeed's
    # bf16 path above re-homes the optimizer's parameters, and the static step keeps fp32 weights under autocast
    rows += static_step_rows(cfg, stream, counter, batch, steps, repeats, device, meta, rt)
    if ds_configs:
        rows += deepspeed_config_rows(cfg, stream, counter, batch, steps, repeats, device, meta, rt)

    # the reference pipeline
    rows.append({"variant": f"reference b{batch}",
                 **reference_pipeline(beton, cfg, batch, steps, repeats, device, workers, meta)})
    ceiling = rows[0]["images_per_s"]
    for r in rows:
        r.setdefault("mode", "eager")
        r["batch"] = batch
        r["vs_model_only"] = r["images_per_s"] / ceiling
    return rows


def _fresh_step(cfg, num_classes: int, device: torch.device):
    """A new TrainModule (vit_cifar + the config's tasks, seeded) and its AdamW, as bench_batch builds them."""
    from engine.models import create_model
    from engine.tasks import build_tasks
    from engine.train_module import TrainModule
    from engine.weight_decay import param_groups

    torch.manual_seed(0)
    model = create_model("vit_cifar", num_classes=num_classes)
    module = TrainModule(model, build_tasks(cfg, model.embed_dim, model.grid_size), 0.1).to(device)
    return module, torch.optim.AdamW(param_groups(module, 0.05), lr=1e-4, fused=device.type == "cuda")


def static_step_rows(cfg, stream, counter, batch: int, steps: int, repeats: int, device: torch.device,
                     meta: dict, rt) -> list[dict]:
    """ours_graphed and ours_deepspeed_graphed: graphed on CUDA, emulated elsewhere, or the fallback reason."""
    import deepspeed

    from engine.config import config_from_dict, to_dict
    from engine.graphed_step import StaticStepRunner, engine_fallback_reason, plan_graph_step
    from engine.runtime import deepspeed_config

    asked = "on" if device.type == "cuda" else "emulate"
    cfg = config_from_dict(to_dict(cfg), [f"engine.graph_step={asked}"])
    plan = plan_graph_step(cfg, rt.world_size, device, meta["num_images"])
    autocast = torch.bfloat16 if device.type == "cuda" else None
    rows = []
    for name in ("ours_graphed", "ours_deepspeed_graphed"):
        label = f"{name} ({plan.mode}) b{batch}"
        if plan.reason:
            print(f"{name} b{batch}: graphed step off: {plan.reason}")
            continue
        module, opt = _fresh_step(cfg, meta["num_classes"], device)
        engine, clip = None, cfg.optim.clip_grad
        if name == "ours_deepspeed_graphed":
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt,
                                                   config=deepspeed_config(cfg, rt.world_size, False))
            reason = engine_fallback_reason(engine, opt)
            if reason:
                print(f"{name} b{batch}: graphed step off: {reason}")
                continue
            clip = cfg.optim.clip_grad   # as train() gives the runner (DeepSpeed's own clipping is off at ZeRO 0)
        runner = StaticStepRunner(module, opt, plan.mode, device, autocast, False, clip=clip, engine=engine)
        numbers = iter(range(10**9))

        def step():
            i = next(numbers)
            runner.step(next(stream), 1e-4, next(counter), 30.0, i)
        rows.append({"variant": label, "mode": plan.mode,
                     **_rate(step, batch, steps, repeats, device, warmup=runner.warmup_steps + 2)})
        report = runner.read()   # the device buffers: every timed step was finite and reached the optimizer
        if report.nonfinite or report.steps == 0:
            raise RuntimeError(f"{label}: {report.nonfinite} non-finite of {report.steps} steps")
    return rows


def deepspeed_config_rows(cfg, stream, counter, batch: int, steps: int, repeats: int, device: torch.device,
                          meta: dict, rt) -> list[dict]:
    """DeepSpeed's eager step (engine(batch), backward, step: what `smallvit train` runs) per configuration: ZeRO 0
    or 1 x bf16 by torch.autocast or by DeepSpeed's bf16 optimizer x torch fused AdamW or DeepSpeed's AdamW."""
    import deepspeed

    from engine.config import config_from_dict, to_dict
    from engine.runtime import deepspeed_config
    from engine.train import param_groups

    cuda = device.type == "cuda"
    rows = []
    for zero in (0, 1):
        for ds_bf16 in (False, True):
            for ds_adam in (False, True):
                label = (f"ds zero{zero} {'ds-bf16' if ds_bf16 else 'autocast'} "
                         f"{'ds-adam' if ds_adam else 'torch-fused'} b{batch}")
                if not cuda and (ds_bf16 or ds_adam):
                    print(f"{label}: not run ({'bf16 compute' if ds_bf16 else 'DeepSpeed FusedAdam'} needs CUDA; "
                          f"the CPU path is fp32 with torch AdamW)")
                    continue
                run_cfg = config_from_dict(to_dict(cfg), [f"engine.zero_stage={zero}"])
                module, opt = _fresh_step(run_cfg, meta["num_classes"], device)
                ds_conf = deepspeed_config(run_cfg, rt.world_size, ds_bf16)
                if ds_adam:   # DeepSpeed builds its own (fused CUDA) AdamW from the config: a JIT-built op
                    ds_conf["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4, "betas": list(cfg.optim.betas),
                                                                        "weight_decay": 0.05}}
                    try:
                        engine, _, _, _ = deepspeed.initialize(model=module, config=ds_conf,
                                                               model_parameters=param_groups(module, 0.05))
                    except Exception as exc:   # e.g. no nvcc to build the op: say so, time the rest
                        print(f"{label}: not run (DeepSpeed could not build its optimizer: {exc})")
                        continue
                else:
                    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_conf)

                def step(engine=engine):
                    b = next(stream)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                        loss, _ = engine(b, 30.0, next(counter))
                    engine.backward(loss)
                    engine.step()
                rows.append({"variant": label, "mode": "eager", "optimizer": type(engine.optimizer).__name__,
                             **_rate(step, batch, steps, repeats, device)})
    return rows


def graphed_model_only(batch: int, device: torch.device):
    """The model-only step (forward + CE + backward + fused AdamW, bf16 autocast) captured as one CUDA graph, per
    PyTorch's whole-network recipe: static input, 3 warm-up steps on a side stream, grads set to None, capture,
    then each call is one replay."""
    from engine.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_cifar", num_classes=10).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-4, device=device), fused=True, capturable=True)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def body():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def reference_pipeline(beton: Path, cfg, batch: int, steps: int, repeats: int, device: torch.device, workers: int,
                       meta: dict) -> dict:
    """torchvision DataLoader + PIL transforms, eager model, per-image translation loop, eager drloc head."""
    import torchvision.transforms.functional as TF

    from engine.models import create_model
    from engine.tasks.drloc import DrlocHead
    from kernels import drloc_reference as ref
    from loaders.order import EpochPlan
    from loaders.torchvision_loader import TorchvisionLoader
    from loaders.transforms.pipeline import TrainTransform

    plan = EpochPlan(meta["num_images"], batch, seed=0)
    transform = TrainTransform(cfg.data, meta["mean"], meta["std"], 0, num_classes=meta["num_classes"],
                               label_smoothing=0.1)
    loader = TorchvisionLoader(str(beton), plan, transform, device, num_workers=workers, style="pil")
    model = create_model("vit_cifar", num_classes=meta["num_classes"]).to(device)
    head = DrlocHead(model.embed_dim, model.grid_size).to(device)
    trans_head = torch.nn.Sequential(torch.nn.LayerNorm(2 * model.embed_dim), torch.nn.Linear(2 * model.embed_dim, 384),
                                     torch.nn.GELU(), torch.nn.Linear(384, 2)).to(device)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters(), *trans_head.parameters()], lr=1e-4)
    grid = torch.linspace(-0.2, 0.2, 10).tolist()
    rng = np.random.default_rng(0)
    stream = _batches(loader)

    def step():
        b = next(stream)
        moved, targets = [], []
        for img in b.images:                               # the reference's per-image translation loop
            ix, iy = rng.integers(0, 10, 2)
            moved.append(TF.affine(img, angle=0.0, translate=[grid[ix] * 32, grid[iy] * 32], scale=1.0, shear=[0.0],
                                   interpolation=TF.InterpolationMode.NEAREST, fill=128.0))
            targets.append([ix / 9, iy / 9])
        tx = torch.stack(moved)
        t = torch.tensor(targets, device=device)
        o1, o2 = model.forward_with_tokens(b.images), model.forward_with_tokens(tx)
        loss = F.cross_entropy(o1.logits, b.labels) + 0.5 * F.cross_entropy(o2.logits, b.labels)
        pred = trans_head(torch.cat([o1.tokens.mean(1), o2.tokens.mean(1)], -1))
        loss = loss + F.l1_loss(pred, t)
        for out in (o1, o2):
            p_i, p_j = ref.sample_pair_positions(len(b), out.grid, 64, device=device)
            target = ref.pair_offset_targets(p_i, p_j, out.grid)
            loss = loss + 0.1 * ref.l1_loss(head(ref.gather_pairs(out.patch_tokens, p_i, p_j))[0], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _rate(step, batch, steps, repeats, device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--batch", default="512,1024,2048" if cuda else "32", help="comma list of batch sizes")
    ap.add_argument("--steps", type=int, default=20 if cuda else 2, help="steps per repeat")
    ap.add_argument("--repeats", type=int, default=5 if cuda else 2)
    ap.add_argument("--images", type=int, default=8192 if cuda else 512, help="random 32x32 training images")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="reference pipeline's workers")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--no-record", action="store_true", help="do not add lines to bench/results/README.md")
    ap.add_argument("--ds-configs", action="store_true",
                    help="also time DeepSpeed's step under ZeRO 0/1 x autocast/DeepSpeed bf16 x torch/DeepSpeed AdamW")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    from loaders.convert.arrays import ArraySource
    from loaders.convert.writer import WriteOptions, write_beton

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        beton = Path(tmp) / "train.beton"
        write_beton(ArraySource(rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8),
                                rng.integers(0, 10, args.images), [str(i) for i in range(10)], "random", "train"),
                    beton, WriteOptions(num_workers=1, progress=False))
        for batch in (int(b) for b in args.batch.split(",")):
            rows += bench_batch(beton, batch, args.steps, args.repeats, device, args.workers, args.ds_configs)
    print_table(rows, ["variant", "mode", "images_per_s", "step_ms", "min_ms", "max_ms", "vs_model_only"])
    write_results("train", rows, "images_per_s", "variant", "img/s", out_dir=args.out_dir, record=not args.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
