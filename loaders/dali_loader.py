"""NVIDIA DALI loader for JPEG sets: a .beton's JPEG field (read straight from the file) or an ImageFolder tree.

Our epoch plan decides the order: each batch's encoded samples go into the pipeline through `external_source`,
DALI decodes them (`fn.decoders.image`, device='mixed' — nvJPEG on the GPU — when the training device is CUDA,
'cpu' otherwise) and the decoded uint8 batch goes through the same batched TrainTransform as every other loader,
on the training device. Using DALI only for the decode keeps the augmentation identical across loaders (same
keys, same ops, same Batch); DALI's own AutoAugment does not follow torchvision's definitions (its policies use
other magnitude ranges), so it is not used.

A raw-pixel .beton works too (nothing to decode: the pixels pass through the pipeline unchanged); the DALI path
only pays off for JPEG data.

The decode runs `prefetch` batches ahead of the training step on a background thread (loaders/prefetch.py), so
DALI decodes batch n+1 while batch n is augmented and trained on; `prefetch=0` decodes each batch when asked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from loaders.batch import Batch
from loaders.order import EpochPlan
from loaders.prefetch import Prefetcher
from loaders.sidecar import DatasetFileError
from loaders.transforms.pipeline import TrainTransform


class BetonSamples:
    """Encoded samples of a .beton's image field, read by pointer from a memory map (no FFCV decode)."""

    def __init__(self, path: str | Path):
        from ffcv.reader import Reader

        path = Path(path)
        if not path.is_file():
            raise DatasetFileError(f"{path}: no such dataset file")
        try:
            reader = Reader(str(path))
        except Exception as exc:  # FFCV raises assorted errors on a bad header
            raise DatasetFileError(f"{path}: not a readable .beton ({type(exc).__name__}: {exc})") from None
        if "image" not in reader.field_names or "label" not in reader.field_names:
            raise DatasetFileError(f"{path}: needs fields 'image' and 'label', has {reader.field_names}")
        image = reader.metadata[f"f{reader.field_names.index('image')}"]
        self.labels = np.asarray(reader.metadata[f"f{reader.field_names.index('label')}"], dtype=np.int64)
        self.modes = np.asarray(image["mode"])
        self.heights = np.asarray(image["height"], dtype=np.int64)
        self.widths = np.asarray(image["width"], dtype=np.int64)
        ptrs = np.asarray(image["data_ptr"], dtype=np.uint64)
        table = np.sort(reader.alloc_table, order="ptr")
        at = np.searchsorted(table["ptr"], ptrs)
        if np.any(at >= len(table)) or np.any(table["ptr"][np.minimum(at, len(table) - 1)] != ptrs):
            raise DatasetFileError(f"{path}: allocation table does not cover every image")
        self.ptrs = ptrs.astype(np.int64)
        self.sizes = table["size"][at].astype(np.int64)
        self.memory = np.memmap(path, dtype=np.uint8, mode="r")
        self.path = path

    @property
    def jpeg(self) -> bool:
        return bool(np.all(self.modes == 0))

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, i: int) -> np.ndarray:
        """JPEG bytes (jpg mode) or H*W*3 pixels (raw mode) of sample i, 1-D uint8."""
        return np.asarray(self.memory[self.ptrs[i]:self.ptrs[i] + self.sizes[i]])

    def raw(self, i: int) -> np.ndarray:
        return self.encoded(i)[: self.heights[i] * self.widths[i] * 3].reshape(self.heights[i], self.widths[i], 3)


class FolderSamples:
    """JPEG files of an ImageFolder tree (the converter's listing: its class and file order)."""

    def __init__(self, root: str | Path):
        from loaders.torchvision_loader import image_folder_files

        self.files, self.labels, self.classes = image_folder_files(root)
        self.jpeg = True

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, i: int) -> np.ndarray:
        return np.fromfile(self.files[i], dtype=np.uint8)


def _decode_pipeline(batch_size: int, num_threads: int, device: torch.device, decode: bool):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads),
                  device_id=(device.index or 0) if gpu else None, prefetch_queue_depth=1)
    def pipe():
        data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1 if decode else 3)
        if decode:
            return fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB)
        return data.gpu() if gpu else data

    p = pipe()
    p.build()
    return p


def _to_torch(out, device: torch.device) -> torch.Tensor:
    """A uniform DALI TensorList (B, H, W, 3) uint8 -> torch (B, 3, H, W) on `device`."""
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        shape = out.as_tensor().shape()
        dst = torch.empty(shape, dtype=torch.uint8, device=device)
        feed_ndarray(out.as_tensor(), dst, cuda_stream=torch.cuda.current_stream(device))
        return dst.permute(0, 3, 1, 2).contiguous()
    return torch.from_numpy(out.as_array()).permute(0, 3, 1, 2).contiguous()


class DALILoader:
    """Yields `Batch`es for one rank; `source` is a .beton (jpg or raw) or an ImageFolder directory."""

    def __init__(self, source: str | Path, plan: EpochPlan, transform, device: torch.device, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, image_size: Optional[int] = None, prefetch: int = 2):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        source = Path(source)
        self.samples = FolderSamples(source) if source.is_dir() else BetonSamples(source)
        if len(self.samples) != plan.num_samples:
            raise DatasetFileError(f"{source}: holds {len(self.samples)} samples, the plan expects {plan.num_samples}")
        self.decode = self.samples.jpeg
        self.plan, self.transform, self.device = plan, transform, device
        self.rank, self.world_size = rank, world_size
        self.image_size = image_size
        self.pipe = _decode_pipeline(plan.per_rank_batch(world_size), num_workers, device, self.decode)
        self.prefetch = prefetch
        self._active: Optional[Prefetcher] = None   # the running epoch's decode thread (one pipeline, one user)

    def __len__(self) -> int:
        return self.plan.steps()

    def _decode(self, idx: np.ndarray) -> torch.Tensor:
        if self.device.type == "cuda":   # the prefetch thread starts on device 0; a rank's device may be another
            with torch.cuda.device(self.device):
                return self._decode_on_device(idx)
        return self._decode_on_device(idx)

    def _decode_on_device(self, idx: np.ndarray) -> torch.Tensor:
        if self.decode:
            self.pipe.feed_input("encoded", [self.samples.encoded(int(i)) for i in idx])
        else:
            self.pipe.feed_input("encoded", [self.samples.raw(int(i)) for i in idx])
        (out,) = self.pipe.run()
        if not out.is_dense_tensor():
            raise DatasetFileError(f"{getattr(self.samples, 'path', 'dataset')}: images of different sizes in one "
                                   "batch (resize them when converting)")
        images = _to_torch(out, self.device)
        if self.image_size and images.shape[-2:] != (self.image_size, self.image_size):
            raise DatasetFileError(f"{getattr(self.samples, 'path', 'dataset')}: images are "
                                   f"{images.shape[-2]}x{images.shape[-1]}, data.image_size is {self.image_size}")
        return images

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = self.plan.rank_order(epoch, self.rank, self.world_size, start_step)
        repeats = torch.from_numpy(self.plan.rank_repeats(self.rank, self.world_size, start_step))
        per = self.plan.per_rank_batch(self.world_size)
        starts = range(0, len(order), per)
        if self._active is not None:   # an earlier epoch left unfinished: its thread must let go of the pipeline
            self._active.close()
        if self.prefetch:
            decoded = self._active = Prefetcher(lambda s: self._decode(order[s:s + per]), starts, self.prefetch)
        else:
            decoded = ((s, self._decode(order[s:s + per])) for s in starts)
        try:
            for s, images in decoded:
                yield self._batch(order[s:s + per], images, repeats[s:s + per], epoch)
        finally:
            decoded.close()   # a Prefetcher stops its thread; the on-demand generator just ends

    def _batch(self, idx: np.ndarray, images: torch.Tensor, repeats: torch.Tensor, epoch: int) -> Batch:
        labels = torch.from_numpy(self.samples.labels[idx]).to(self.device)
        index = torch.from_numpy(idx).to(self.device)
        if isinstance(self.transform, TrainTransform):
            return self.transform(images, labels, index, epoch, repeats.to(self.device))
        return self.transform(images, labels, index, epoch)
