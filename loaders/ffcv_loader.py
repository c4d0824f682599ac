"""FFCV loader over a .beton: FFCV decodes with its compiled pipeline on `num_workers` threads; our epoch plan
(loaders.order) decides the order, so shards, repeats and mid-epoch resume are exact; the batched transforms
run on the training device right after the copy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from loaders.batch import Batch
from loaders.order import EpochPlan
from loaders.sidecar import DatasetFileError
from loaders.upload import upload


def open_beton(path: str | Path, batch_size: int, num_workers: int = 1, os_cache: bool = True):
    """An FFCV Loader yielding (uint8 (B, 3, H, W) CPU tensor, (B,) int labels) in the order we give it.

    JPEG samples are decoded with the accurate IDCT (loaders.jpeg), the pixels PIL and DALI's CPU decoder give."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    from loaders.jpeg import accurate_rgb_decoder

    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(f"{path}: no such dataset file")
    try:
        return Loader(str(path), batch_size=batch_size, num_workers=max(1, num_workers),
                      order=OrderOption.SEQUENTIAL, os_cache=os_cache, drop_last=False,
                      pipelines={"image": [accurate_rgb_decoder(), ToTensor(), ToTorchImage()],
                                 "label": [IntDecoder(), ToTensor(), Squeeze()]})
    except Exception as exc:  # FFCV raises assorted errors (struct, value, key) on a bad header
        raise DatasetFileError(f"{path}: not a readable .beton ({type(exc).__name__}: {exc})") from None


def check_beton(path: str | Path, meta: dict) -> None:
    """Open the .beton header (milliseconds) and check it against its sidecar; DatasetFileError naming the file."""
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(f"{path}: no such dataset file")
    try:
        reader = Reader(str(path))
    except Exception as exc:  # FFCV asserts on a bad header and raises assorted errors on a short file
        raise DatasetFileError(f"{path}: not a readable .beton ({type(exc).__name__}: {exc})") from None
    fields = list(reader.handlers)
    if fields[:2] != ["image", "label"]:
        raise DatasetFileError(f"{path}: fields {fields}, expected image and label")
    if reader.num_samples != meta["num_images"]:
        raise DatasetFileError(f"{path}: holds {reader.num_samples} samples, its sidecar says {meta['num_images']}")


def beton_labels(reader) -> np.ndarray:
    """(N,) int64 labels of an open .beton (an ffcv Reader), from its metadata table (no decode)."""
    return np.array(reader.metadata[f"f{reader.field_names.index('label')}"], dtype=np.int64)


def beton_pages(path: str | Path) -> np.ndarray:
    """(N,) int64: the page of the .beton holding each sample's data (its first allocation), as FFCV's memory
    managers and its quasi-random order count pages."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    table = reader.alloc_table
    pages = np.full(reader.num_samples, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(pages, table["sample_id"].astype(np.int64),
                  (table["ptr"] >> np.uint64(int(np.log2(reader.page_size)))).astype(np.int64))
    if np.any(pages == np.iinfo(np.int64).max):
        raise DatasetFileError(f"{path}: some samples have no data in the allocation table")
    return pages


def iterate_order(loader, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run FFCV's epoch iterator over exactly `order` (a sequence of sample indices)."""
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    if len(order) == 0:
        return
    Compiler.set_num_threads(loader.num_workers)
    if loader.code is None or loader.recompile:
        loader.generate_code()
    yield from EpochIterator(loader, np.asarray(order, dtype=np.int64))


def read_all(path: str | Path, num_workers: int = 1, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole .beton: (uint8 (N, 3, H, W), int64 (N,)) on the CPU, in file order."""
    loader = open_beton(path, batch_size, num_workers)
    n = loader.reader.num_samples
    images, labels = [], []
    for x, y in iterate_order(loader, np.arange(n)):
        images.append(x.clone())  # FFCV reuses its output buffers
        labels.append(y.to(torch.int64).clone())
    return torch.cat(images).contiguous(), torch.cat(labels)


class FFCVLoader:
    """Yields `Batch`es for one rank; `epoch(e, start_step)` restarts the plan anywhere in an epoch.

    Labels live on the device (read once from the .beton's metadata) and so does each epoch's order (one
    upload per epoch): a batch's labels and index are slices there, and its images the one host-to-device copy,
    staged in pinned memory and queued without waiting (loaders.upload).
    """

    def __init__(self, path: str | Path, plan: EpochPlan, transform, device: torch.device, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, os_cache: bool = True):
        self.plan, self.transform, self.device = plan, transform, device
        self.rank, self.world_size = rank, world_size
        self.loader = open_beton(path, plan.per_rank_batch(world_size), num_workers, os_cache)
        if self.loader.reader.num_samples != plan.num_samples:
            raise DatasetFileError(f"{path}: holds {self.loader.reader.num_samples} samples, "
                                   f"its sidecar says {plan.num_samples}")
        self.labels = upload(torch.from_numpy(beton_labels(self.loader.reader)), device)

    def __len__(self) -> int:
        return self.plan.steps()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = self.plan.rank_order(epoch, self.rank, self.world_size, start_step)
        on_device = upload(torch.from_numpy(order), self.device)
        repeats = upload(torch.from_numpy(self.plan.rank_repeats(self.rank, self.world_size, start_step)),
                         self.device)
        per = self.plan.per_rank_batch(self.world_size)
        for i, (images, _) in enumerate(iterate_order(self.loader, order)):
            index = on_device[i * per:i * per + len(images)]
            yield self.transform(upload(images, self.device, reused=True), self.labels[index], index, epoch,
                                 repeats[i * per:i * per + len(images)])
