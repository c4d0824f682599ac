"""The page layout one FFCV writer process gives, applied to a .beton written by several: bytes that do not depend
on the worker count.

FFCV's workers each fill their own page and book the next free page of the file when theirs is full, so which
samples share a page, and the order of the pages, follow the workers' timing: every run with more than one worker
gives other bytes. One worker fills pages in sample order: a sample's allocations go on the current page while they
fit and start a fresh page otherwise. `single_writer_layout` rewrites a finished file that way (pages, the
pointers in the per-sample metadata, the allocation table) and zeroes the padding bytes of the per-sample
metadata (where FFCV's workers can leave stray bytes), so any worker count gives the same bytes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

POINTER_FIELDS = ("data_ptr", "ptr")   # per-sample metadata entries that point into the data region


def _without_padding(rows: np.ndarray) -> np.ndarray:
    """A copy of structured `rows` with every padding byte zero (FFCV's workers can leave stray bytes there)."""
    out = np.zeros(rows.shape, dtype=rows.dtype)

    def copy(dst, src):
        if src.dtype.names is None:
            dst[...] = src
        else:
            for name in src.dtype.names:
                copy(dst[name], src[name])

    copy(out, rows)
    return out


def single_writer_layout(src: Path, dest: Path) -> None:
    """Write `src` (a .beton) to `dest` with one writer's page layout; `src` is left unchanged."""
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType
    from ffcv.utils import align_to_page

    reader = Reader(str(src))
    page = int(reader.page_size)
    n = int(reader.num_samples)
    metadata_start = HeaderType.itemsize + reader.field_descriptors.nbytes
    data_start = align_to_page(metadata_start + n * reader.metadata_type.itemsize, page)

    table = np.sort(reader.alloc_table, order=["sample_id", "ptr"])   # malloc order within a sample
    new_ptr = np.empty(len(table), dtype=np.uint64)
    page_of = np.empty(len(table), dtype=np.int64)
    current, used = -1, page
    bounds = np.searchsorted(table["sample_id"], np.arange(n + 1))
    for s in range(n):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        sizes = table["size"][lo:hi].astype(np.int64)
        if hi > lo and used + int(sizes.sum()) > page:
            current, used = current + 1, 0
        for k in range(lo, hi):
            new_ptr[k] = data_start + current * page + used
            page_of[k] = current
            used += int(sizes[k - lo])

    metadata = _without_padding(reader.metadata)
    moved = dict(zip(zip(table["sample_id"].tolist(), table["ptr"].tolist()), new_ptr.tolist()))
    for name in metadata.dtype.names:
        entry = metadata[name]
        for pointer in (p for p in POINTER_FIELDS if entry.dtype.names and p in entry.dtype.names):
            values = entry[pointer]
            for s in range(n):
                key = (s, int(values[s]))
                if key in moved:
                    values[s] = moved[key]

    header = reader.header.copy()
    pages = current + 1
    metadata_end = metadata_start + metadata.nbytes
    header["alloc_table_ptr"] = data_start + pages * page if pages else metadata_end
    new_table = np.zeros(len(table), dtype=ALLOC_TABLE_TYPE)
    new_table["sample_id"], new_table["ptr"], new_table["size"] = table["sample_id"], new_ptr, table["size"]

    data = np.memmap(src, dtype=np.uint8, mode="r")
    with open(dest, "wb") as out:
        out.write(header.tobytes())
        out.write(reader.field_descriptors.tobytes())
        out.write(metadata.tobytes())
        if pages:
            out.write(bytes(data_start - metadata_end))
        buffer = np.zeros(page, dtype=np.uint8)
        k = 0
        for p in range(pages):
            buffer.fill(0)
            while k < len(table) and page_of[k] == p:
                at, size, old = int(new_ptr[k]) - data_start - p * page, int(table["size"][k]), int(table["ptr"][k])
                buffer[at:at + size] = data[old:old + size]
                k += 1
            out.write(buffer.tobytes())
        out.write(new_table.tobytes())
    del data
