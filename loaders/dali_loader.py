"""NVIDIA DALI loader for JPEG sets: a .beton's JPEG field (read straight from the file) or an ImageFolder tree.

Our epoch plan decides the order: each batch's encoded samples go into the pipeline through `external_source`,
DALI decodes them (`fn.decoders.image`, device='mixed' — nvJPEG on the GPU — when the training device is CUDA,
'cpu' otherwise or when asked: `decoder='cpu'`, then one pinned non-blocking upload per batch) and the decoded
uint8 batch goes through the same batched TrainTransform as every other loader, on the training device. Labels
and the epoch's order live on the device, so a batch's labels and index are device slices, not copies. Using DALI only for the decode keeps the augmentation identical across loaders (same
keys, same ops, same Batch); DALI's own AutoAugment does not follow torchvision's definitions (its policies use
other magnitude ranges), so it is not used.

A raw-pixel .beton works too (nothing to decode: the pixels pass through the pipeline unchanged); the DALI path
only pays off for JPEG data.

The decode runs `prefetch` batches ahead of the training step on a background thread (loaders/prefetch.py), so
DALI decodes batch n+1 while batch n is augmented and trained on; `prefetch=0` decodes each batch when asked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from loaders.batch import Batch
from loaders.order import EpochPlan
from loaders.prefetch import Prefetcher
from loaders.sidecar import DatasetFileError
from loaders.transforms.pipeline import TrainTransform
from loaders.upload import upload


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
        from loaders.ffcv_loader import beton_labels

        image = reader.metadata[f"f{reader.field_names.index('image')}"]
        self.labels = beton_labels(reader)
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


def _decode_pipeline(batch_size: int, num_threads: int, device: torch.device, decode: bool, gpu: bool):
    """gpu: decode with nvJPEG ('mixed') and hand out device memory of `device`; else a CPU-only pipeline."""
    from nvidia.dali import fn, pipeline_def, types

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


def _to_torch(out, device: torch.device, gpu: bool) -> torch.Tensor:
    """A uniform DALI TensorList (B, H, W, 3) uint8 -> torch (B, 3, H, W): on `device` from a GPU pipeline,
    on the CPU from a CPU one."""
    if gpu:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        shape = out.as_tensor().shape()
        dst = torch.empty(shape, dtype=torch.uint8, device=device)
        feed_ndarray(out.as_tensor(), dst, cuda_stream=torch.cuda.current_stream(device))
        return dst.permute(0, 3, 1, 2).contiguous()
    return torch.from_numpy(out.as_array()).permute(0, 3, 1, 2).contiguous()


class _Decoder:
    """The DALI pipeline and the samples it reads: all the prefetch thread holds. Never the loader: a loader
    referenced from its own prefetch thread's callable is a reference cycle, freed only by the cycle collector,
    which may first run in a forked DataLoader worker, where DALI's shutdown waits forever for threads the fork
    did not copy."""

    def __init__(self, samples, pipe, device: torch.device, gpu: bool, image_size: Optional[int]):
        self.samples, self.pipe, self.device, self.gpu, self.image_size = samples, pipe, device, gpu, image_size

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        if self.pipe is None:
            raise RuntimeError("DALI loader is closed")
        if self.gpu:   # the prefetch thread starts on device 0; a rank's device may be another
            with torch.cuda.device(self.device):
                return self._decode(idx)
        return self._decode(idx)

    def _decode(self, idx: np.ndarray) -> torch.Tensor:
        raw = not self.samples.jpeg
        self.pipe.feed_input("encoded", [self.samples.raw(int(i)) if raw else self.samples.encoded(int(i))
                                         for i in idx])
        (out,) = self.pipe.run()
        where = getattr(self.samples, "path", "dataset")
        if not out.is_dense_tensor():
            raise DatasetFileError(f"{where}: images of different sizes in one batch (resize them when converting)")
        images = _to_torch(out, self.device, self.gpu)
        if self.image_size and images.shape[-2:] != (self.image_size, self.image_size):
            raise DatasetFileError(f"{where}: images are {images.shape[-2]}x{images.shape[-1]}, "
                                   f"data.image_size is {self.image_size}")
        return images

    def chunks(self, order: np.ndarray, per: int) -> Callable[[int], torch.Tensor]:
        """start -> the decoded batch order[start:start + per]."""
        return lambda start: self(order[start:start + per])


class DALILoader:
    """Yields `Batch`es for one rank; `source` is a .beton (jpg or raw) or an ImageFolder directory.

    `close()` (or a `with` block, or dropping the last reference) stops a running epoch's decode thread and frees
    the DALI pipeline with its buffers at once.
    """

    def __init__(self, source: str | Path, plan: EpochPlan, transform, device: torch.device, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, image_size: Optional[int] = None, prefetch: int = 2,
                 decoder: Optional[str] = None):
        """decoder: 'mixed' (nvJPEG on the GPU; CUDA only), 'cpu' (libjpeg-turbo on CPU threads, then one pinned
        non-blocking upload per batch) or None: mixed on CUDA, cpu elsewhere."""
        self._active: Optional[Prefetcher] = None   # the running epoch's decode thread (one pipeline, one user)
        self.decoder: Optional[_Decoder] = None
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        decoder = decoder or ("mixed" if device.type == "cuda" else "cpu")
        if decoder not in ("mixed", "cpu") or (decoder == "mixed" and device.type != "cuda"):
            raise ValueError(f"DALI decoder must be 'cpu', or 'mixed' on a CUDA device; got {decoder!r} on {device}")
        source = Path(source)
        self.samples = FolderSamples(source) if source.is_dir() else BetonSamples(source)
        if len(self.samples) != plan.num_samples:
            raise DatasetFileError(f"{source}: holds {len(self.samples)} samples, the plan expects {plan.num_samples}")
        self.plan, self.transform, self.device = plan, transform, device
        self.rank, self.world_size = rank, world_size
        self.labels = upload(torch.from_numpy(self.samples.labels), device)      # on the device, once
        gpu = decoder == "mixed"
        pipe = _decode_pipeline(plan.per_rank_batch(world_size), num_workers, device, self.samples.jpeg, gpu)
        self.decoder = _Decoder(self.samples, pipe, device, gpu, image_size)
        self.prefetch = prefetch

    def __len__(self) -> int:
        return self.plan.steps()

    def close(self) -> None:
        """Stop the running epoch's decode thread and free the pipeline (idempotent); epoch() then raises."""
        if self._active is not None:
            self._active.close()
            self._active = None
        if self.decoder is not None:
            self.decoder.pipe = None

    def __enter__(self) -> "DALILoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if self.decoder is None or self.decoder.pipe is None:
            raise RuntimeError("DALI loader is closed")
        order = self.plan.rank_order(epoch, self.rank, self.world_size, start_step)
        on_device = upload(torch.from_numpy(order), self.device)
        repeats = upload(torch.from_numpy(self.plan.rank_repeats(self.rank, self.world_size, start_step)),
                         self.device)
        per = self.plan.per_rank_batch(self.world_size)
        starts = range(0, len(order), per)
        if self._active is not None:   # an earlier epoch left unfinished: its thread must let go of the pipeline
            self._active.close()
        decode = self.decoder.chunks(order, per)
        if self.prefetch:
            decoded = self._active = Prefetcher(decode, starts, self.prefetch)
        else:
            decoded = ((s, decode(s)) for s in starts)
        done = 0
        try:
            for s, images in decoded:
                yield self._batch(on_device[s:s + per], upload(images, self.device), repeats[s:s + per], epoch)
                done += 1
        finally:
            decoded.close()   # a Prefetcher stops its thread; the on-demand generator just ends
        if done < len(starts) and self.decoder.pipe is None:
            raise RuntimeError("DALI loader closed during an epoch")

    def _batch(self, index: torch.Tensor, images: torch.Tensor, repeats: torch.Tensor, epoch: int) -> Batch:
        """index, images, repeats: the batch's slices, on the device."""
        if isinstance(self.transform, TrainTransform):
            return self.transform(images, self.labels[index], index, epoch, repeats)
        return self.transform(images, self.labels[index], index, epoch)
