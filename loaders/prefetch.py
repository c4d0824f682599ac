"""Run a loader's decode step ahead of the consumer on a background thread.

    for idx, images in Prefetcher(decode, chunks, depth=2):   # decode(chunk) -> images, `depth` chunks ahead
        ...

The decode calls run in order on one thread (they may hold a non-thread-safe object such as a DALI pipeline);
the consumer receives the results in the same order. A decode error is raised in the consumer at the chunk that
failed. Closing the iterator early (a `break`, a generator closed mid-epoch) stops the thread after its current
chunk and waits for it, so the next epoch can use the same pipeline; an iterator neither exhausted nor closed
keeps its (daemon) thread waiting, so owners close it (the DALI loader does when its epoch generator ends, when
the next epoch starts and when the loader is closed). The decode callable must not hold the iterator's owner (a
reference cycle). DALI's decode work runs in its own threads and releases the GIL, so the decode of chunk n+1
overlaps the consumer's work on chunk n.

On CUDA the producer thread runs on its own current stream (the default one); each result carries an event the
consumer's current stream waits on, and the tensor is recorded on the consumer's stream for the caching allocator.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")

_DONE = object()


class Prefetcher(Iterator[tuple[T, torch.Tensor]]):
    def __init__(self, decode: Callable[[T], torch.Tensor], chunks: Sequence[T] | Iterable[T], depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._decode, self._chunks = decode, chunks
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="smallvit-prefetch", daemon=True)
        self._finished = False
        self._thread.start()

    def _put(self, item) -> bool:
        """Put unless asked to stop (a full queue is re-checked so close() never waits on a blocked producer)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for chunk in self._chunks:
                if self._stop.is_set():
                    return
                images = self._decode(chunk)
                event = None
                if images.is_cuda:
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(images.device))
                if not self._put(("ok", chunk, images, event)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there at the failing chunk
            self._put(("error", exc, None, None))
            return
        self._put((_DONE, None, None, None))

    def __iter__(self) -> "Prefetcher[T]":
        return self

    def __next__(self) -> tuple[T, torch.Tensor]:
        if self._finished:
            raise StopIteration
        kind, chunk, images, event = self._queue.get()
        if kind is _DONE:
            self.close()
            raise StopIteration
        if kind == "error":
            self.close()
            raise chunk
        if event is not None:
            consumer = torch.cuda.current_stream(images.device)
            consumer.wait_event(event)
            images.record_stream(consumer)
        return chunk, images

    def close(self) -> None:
        """Stop the producer after its current chunk and wait for it (idempotent)."""
        self._finished = True
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
