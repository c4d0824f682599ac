"""The augmentation on static buffers (loaders/transforms/captured.py): bit-equal to the eager transform, batch after
batch, on odd shapes and every recipe; cheap to launch.

On the CPU the static path runs emulated (data.capture_transform=emulate: static inputs, the body replayed on them,
static outputs cloned out); on a CUDA machine the real graph replay is compared with the eager path too. Launches
are counted on the 'meta' device (bench.counting): what a GPU launches per batch from the host.
"""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from engine.config import DataConfig
from loaders.transforms.perceptibility import PerceptibilityTransform
from loaders.transforms.captured import CapturedTransform
from loaders.transforms.pipeline import TrainTransform
from loaders.transforms.sync_free import forced_sync_free
from test_transforms_sync_free import _batch_tensors, _images, _recipes

FULL = DataConfig(auto_augment="cifar10", erasing_prob=0.25, mixup_alpha=1.0, cutmix_alpha=1.0)


def _pair(data, perc, mode):
    make = lambda capture: TrainTransform(dataclasses.replace(data, capture_transform=capture),  # noqa: E731
                                          [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], seed=3, num_classes=10,
                                          batch_transforms=[perc])
    return make("off"), make(mode)


def _inputs(n, h, w, step, device="cpu"):
    index = (torch.arange(n) * 7 + 13 * step) % 97
    return (_images(n, h, w, seed=step).to(device), (index % 10).to(device), index.to(device), step % 3,
            (index % 2).to(device))


@pytest.mark.parametrize("recipe", range(len(_recipes())))
@pytest.mark.parametrize("n,h,w", [(7, 32, 32), (5, 31, 33)])
def test_static_buffers_give_the_eager_batches(recipe, n, h, w):
    """Warm-up, first static batch, later ones (other samples, epochs, repeats), then a short batch: every Batch
    tensor equal to the eager transform's, and a Batch kept from an earlier call is not overwritten."""
    data, perc = _recipes()[recipe]
    eager, static = _pair(data, perc, "emulate")
    with forced_sync_free(True):
        kept = None
        for step, size in enumerate((n, n, n, n, 3, 3, 3)):
            want = _batch_tensors(eager(*_inputs(size, h, w, step)))
            got = _batch_tensors(static(*_inputs(size, h, w, step)))
            assert want.keys() == got.keys()
            assert [k for k in want if not torch.equal(want[k], got[k])] == [], step
            if step == 1:
                kept = {k: v.clone() for k, v in got.items()}, got
        assert all(torch.equal(v, kept[1][k]) for k, v in kept[0].items())
    assert static._recipe_graphs.replays == 3 + 2        # size n: steps 1-3; size 3: steps 5-6 (4: its warm-up)


def test_finish_stage_static_equals_eager():
    """The torchvision loader's path (uint8 stage per image in workers, the batch stage here) on static buffers."""
    data, perc = _recipes()[3]
    eager, static = _pair(data, perc, "emulate")
    for step in range(3):
        x, labels, index, _, repeat = _inputs(6, 32, 32, step)
        keys = eager.keys(index, step, repeat)
        a = eager.finish(x, labels, index, keys, eager.batch_key(index, step, repeat), {"crop": index[:, None]})
        b = static.finish(x, labels, index, keys, static.batch_key(index, step, repeat), {"crop": index[:, None]})
        ta, tb = _batch_tensors(a), _batch_tensors(b)
        assert list(a.params) == list(b.params) and list(a.params)[0] == "crop"
        assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    assert static._finish_graphs.replays == 2


def test_modes_and_fallbacks(caplog):
    calls = []

    def body(x):
        calls.append(1)
        return {"y": x + 1}

    with pytest.raises(ValueError, match="data.capture_transform"):
        CapturedTransform(body, "on")
    auto = CapturedTransform(body, "auto")
    for _ in range(3):
        assert torch.equal(auto(torch.ones(2))["y"], torch.full((2,), 2.0))
    assert auto.replays == 0 and len(calls) == 3          # no CUDA: eager, silently
    broken = CapturedTransform(lambda x: {"y": x.sum().item() + x}, "emulate")

    def refuse(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")
    with caplog.at_level(logging.INFO, "smallvit.loaders"):
        broken._prepare = refuse.__get__(broken)
        for _ in range(3):
            assert torch.equal(broken(torch.ones(2))["y"], torch.full((2,), 3.0))
    assert broken.replays == 0 and "transform graph off: capture failed (RuntimeError" in caplog.text


def test_full_recipe_launches_at_most_100_per_batch_on_static_buffers():
    """Counted on the meta device: the eager full recipe dispatches hundreds of ops per batch; on static buffers a
    batch is its keys, the input copies, one replay and the output clones."""
    from bench.counting import DeviceWork

    perc = PerceptibilityTransform()
    meta = torch.device("meta")
    counts = {}
    for mode in ("off", "emulate"):
        t = TrainTransform(dataclasses.replace(FULL, capture_transform=mode), [0.5] * 3, [0.25] * 3, 0,
                           num_classes=10, batch_transforms=[perc])
        with forced_sync_free(True), DeviceWork():
            for step in range(4):
                x, labels, index, epoch, repeat = _inputs(64, 32, 32, step, meta)
                before = t._recipe_graphs.replays
                with DeviceWork() as work:
                    t(x, labels, index, epoch, repeat)
                counts[mode, step] = work.ops + t._recipe_graphs.replays - before
    assert counts["off", 3] > 300                          # eager: AutoAugment runs every op it can draw
    assert counts["emulate", 3] <= 100                     # step 0 eager, 1 makes the static buffers
    assert counts["emulate", 3] == counts["emulate", 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the emulated path runs without)")
@pytest.mark.parametrize("recipe", range(len(_recipes())))
def test_cuda_graph_replays_give_the_eager_batches_on_a_gpu(recipe):
    data, perc = _recipes()[recipe]
    eager, graphed = _pair(data, perc, "auto")
    for step, size in enumerate((7, 7, 7, 7, 3, 3, 3)):
        want = _batch_tensors(eager(*_inputs(size, 31, 33, step, "cuda")))
        got = _batch_tensors(graphed(*_inputs(size, 31, 33, step, "cuda")))
        assert [k for k in want if not torch.equal(want[k], got[k])] == [], step
    assert graphed._recipe_graphs.replays == 3 + 2
