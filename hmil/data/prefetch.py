"""Bags read ahead by a thread while the model computes: a cohort larger than the feature
cache then costs the slower of reading and computing per epoch, not their sum. A thread,
not DataLoader workers, so the bags it reads land in the one process's feature cache
(:class:`hmil.data.bags.CacheBudget`); torch and HDF5 release the interpreter while they
work, so the two overlap."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader

_END = object()


class Prefetched:
    """Iterates ``batches`` (e.g. a DataLoader without workers) in a background thread,
    up to ``depth`` batches ahead; same batches, same order, same errors (raised where the
    consumer asks for the batch that failed). Leaving the loop early stops the thread."""

    def __init__(self, batches: Iterable[Any], depth: int = 2) -> None:
        self.batches = batches
        self.depth = depth

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for batch in self.batches:
                    if not put(batch):
                        return
                put(_END)
            except BaseException as error:  # handed to the consumer, raised there
                put(error)

        reader = threading.Thread(target=read, name="bag-reader", daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            reader.join()


def read_ahead(loader: DataLoader) -> Iterable[Any]:
    """``loader``'s batches, read ahead by a thread when it has no worker processes (which
    read ahead themselves)."""
    return Prefetched(loader) if loader.num_workers == 0 else loader
