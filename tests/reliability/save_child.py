"""A process that only trains a tiny model a step at a time and checkpoints it, for the save-crash tests (item 5).

    python tests/reliability/save_child.py OUT_DIR fsize N     save step 1, then save step 2 with every file
                                                               limited to N bytes (SIGXFSZ kills it mid-write)
    python tests/reliability/save_child.py OUT_DIR loop        save step 1, print "ready", then step and save
                                                               steps 2, 3, ... until killed

`build_engine` is shared with the tests, which load what this process left with a fresh engine.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch


def build_engine(zero_stage: int = 0):
    """A DeepSpeed engine around TrainModule(2-block width-32 ViT, no tasks), AdamW, fp32, one rank."""
    import deepspeed

    from engine.config import config_from_dict
    from engine.models import create_model
    from engine.runtime import deepspeed_config, init_runtime
    from engine.train import param_groups
    from engine.train_module import TrainModule

    rt = init_runtime("cpu")
    cfg = config_from_dict({}, ["data.batch_size=4", "engine.precision=fp32", f"engine.zero_stage={zero_stage}"])
    torch.manual_seed(0)
    model = create_model("vit_cifar", num_classes=4, drop_path=0.0, depth=2, embed_dim=32, num_heads=2)
    module = TrainModule(model, torch.nn.ModuleList(), 0.0)
    optimizer = torch.optim.AdamW(param_groups(module, 0.05), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           config=deepspeed_config(cfg, rt.world_size, bf16=False))
    return engine, rt


def train_step(engine, step: int) -> None:
    from loaders.batch import Batch

    g = torch.Generator().manual_seed(step)
    batch = Batch(images=torch.randn(4, 3, 32, 32, generator=g), labels=torch.arange(4), index=torch.arange(4))
    loss, _ = engine(batch, 0.0, step)
    engine.backward(loss)
    engine.step()


def save(engine, rt, out: Path, step: int) -> Path:
    from engine import checkpoint

    return checkpoint.save(engine, out, step, {"epoch": 0, "step_in_epoch": step, "global_step": step,
                                               "best_top1": 0.0, "model": "vit_cifar", "num_classes": 4,
                                               "world_size": 1, "global_batch": 4, "zero_stage": 0}, rt.is_main)


def main(out: Path, mode: str, arg: int = 0) -> None:
    engine, rt = build_engine()
    train_step(engine, 1)
    save(engine, rt, out, 1)
    if mode == "fsize":
        train_step(engine, 2)
        import faults

        faults.limit_file_size(arg)
        save(engine, rt, out, 2)
        return
    print("ready", flush=True)
    step = 1
    while True:
        step += 1
        train_step(engine, step)
        save(engine, rt, out, step)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
