"""loaders/prefetch.py and the DALI loader's decode-ahead: same batches as decoding on demand, decode of the next
chunk under way while the consumer holds the current one, errors at the failing chunk, early exits that leave
the pipeline free for the next epoch."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from loaders.prefetch import Prefetcher


def test_results_in_order_and_decoded_ahead():
    started = []
    second_started = threading.Event()

    def decode(i):
        started.append(i)
        if i == 1:
            second_started.set()
        return torch.full((2,), float(i))

    with Prefetcher(decode, range(5), depth=2) as it:
        first = next(it)
        # the consumer has not asked for chunk 1, yet its decode runs (or ran) on the producer thread
        assert second_started.wait(timeout=10)
        rest = list(it)
    assert [c for c, _ in [first, *rest]] == [0, 1, 2, 3, 4]
    assert all(torch.equal(x, torch.full((2,), float(c))) for c, x in [first, *rest])
    assert started == [0, 1, 2, 3, 4]


def test_depth_bounds_how_far_ahead_it_decodes():
    gate = threading.Event()
    started = []

    def decode(i):
        started.append(i)
        return torch.zeros(1)

    it = Prefetcher(decode, range(10), depth=2)
    next(it)
    gate.wait(0.3)          # give the producer time to run ahead as far as the queue allows
    # one handed out, two queued, one decoded and waiting to be queued: never more
    assert len(started) <= 4
    it.close()


def test_an_error_reaches_the_consumer_at_the_failing_chunk():
    def decode(i):
        if i == 2:
            raise ValueError(f"chunk {i}: broken file")
        return torch.zeros(1)

    it = Prefetcher(decode, range(5), depth=3)
    assert [next(it)[0], next(it)[0]] == [0, 1]
    with pytest.raises(ValueError, match="chunk 2: broken file"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_close_stops_the_producer_blocked_on_a_full_queue():
    it = Prefetcher(lambda i: torch.zeros(1), range(1000), depth=1)
    next(it)
    it.close()
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda i: torch.zeros(1), range(3), depth=0)


# ------------------------------------------------------------------------------------------------ DALI loader
@pytest.fixture(scope="module")
def jpg_beton(tmp_path_factory):
    pytest.importorskip("nvidia.dali")
    import numpy as np

    from loaders.convert.digits import ArraySource
    from loaders.convert.writer import WriteOptions, write_beton

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 20, 20, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("prefetch") / "train.beton"
    write_beton(ArraySource(images, np.arange(50) % 5, list("abcde"), "toy", "train"), path,
                WriteOptions(num_workers=1, progress=False, mode="jpg"))
    return path


def _dali(path, prefetch, seed=4):
    from engine.config import DataConfig
    from loaders.factory import build_loader

    data = DataConfig(dataset="toy", train=str(path), test=str(path), loader="dali", batch_size=8, num_workers=1,
                      crop_padding=2, flip=True, auto_augment="cifar10", drop_last=False, image_size=20)
    loader, _ = build_loader(data, True, seed, torch.device("cpu"))
    loader.prefetch = prefetch
    return loader


def test_dali_prefetch_gives_the_batches_of_on_demand_decoding(jpg_beton):
    ahead, inline = _dali(jpg_beton, 3), _dali(jpg_beton, 0)
    for epoch, start in ((0, 0), (1, 0), (1, 4)):
        a, b = list(ahead.epoch(epoch, start)), list(inline.epoch(epoch, start))
        assert len(a) == len(b) == len(ahead) - start
        for x, y in zip(a, b):
            assert torch.equal(x.index, y.index) and torch.equal(x.images, y.images)
            assert torch.equal(x.labels, y.labels)


def test_dali_epoch_left_early_leaves_no_stale_batch(jpg_beton):
    """A `break` mid-epoch (or a generator never finished) must not leak decoded batches into the next epoch."""
    ahead, inline = _dali(jpg_beton, 2), _dali(jpg_beton, 0)
    for i, _ in enumerate(ahead.epoch(0)):
        if i == 1:
            break
    unfinished = ahead.epoch(0)
    next(unfinished)                      # held, not closed: the next epoch must take the pipeline from it
    got, want = list(ahead.epoch(1, 2)), list(inline.epoch(1, 2))
    assert [b.index.tolist() for b in got] == [b.index.tolist() for b in want]
    assert all(torch.equal(x.images, y.images) for x, y in zip(got, want))
    unfinished.close()


@pytest.mark.parametrize("prefetch", [2, 0])
def test_a_dali_loader_is_freed_when_dropped_and_its_pipeline_when_closed(jpg_beton, prefetch):
    """No reference cycle: with the cycle collector off, dropping a loader mid-epoch (its decode thread running)
    frees it and its pipeline; close() frees the pipeline at once and stops the thread; a closed loader refuses."""
    import gc
    import weakref

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        loader = _dali(jpg_beton, prefetch)
        batches = loader.epoch(0)
        next(batches)
        thread = loader._active._thread if prefetch else None
        gone, pipe_gone = weakref.ref(loader), weakref.ref(loader.decoder.pipe)
        del loader, batches
        assert gone() is None and pipe_gone() is None
        assert thread is None or not thread.is_alive()

        loader = _dali(jpg_beton, prefetch)
        batches = loader.epoch(0)
        next(batches)
        pipe_gone = weakref.ref(loader.decoder.pipe)
        loader.close()
        assert pipe_gone() is None
        with pytest.raises(RuntimeError, match="closed"):
            list(batches)
        with pytest.raises(RuntimeError, match="closed"):
            next(loader.epoch(1))
        with _dali(jpg_beton, prefetch) as other:
            pipe_gone = weakref.ref(other.decoder.pipe)
            assert len(list(other.epoch(0))) == len(other)
        assert pipe_gone() is None
    finally:
        if was_enabled:
            gc.enable()


@pytest.mark.parametrize("order", ["dali,torchvision", "torchvision,dali"])
def test_bench_loaders_ends_with_dali_before_or_after_forked_workers(tmp_path, order):
    """A discarded DALI loader used to stay alive in a reference cycle until the cycle collector first ran, in a
    forked DataLoader worker, where DALI's shutdown waits forever: `bench loaders --loaders dali,torchvision`
    hung. Both orders must end (in a fresh process: the hang needs fork after DALI)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("nvidia.dali")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "bench", "loaders", "--source", "", "--images", "64", "--batch", "16",
           "--workers", "2", "--loaders", order, "--out-dir", str(tmp_path), "--no-record"]
    log = tmp_path / "bench.log"
    with log.open("w") as out:      # a file, not a pipe: a hung worker would hold a pipe open after the kill
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)     # the bench and its DataLoader workers
            proc.wait()
            pytest.fail(f"`{' '.join(cmd[1:])}` did not end within 180 s")
    text = log.read_text()
    assert rc == 0, text[-2000:]
    assert "dali (full recipe)" in text and "torchvision (full recipe)" in text
