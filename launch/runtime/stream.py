"""Endless training batches, epoch after epoch, with the position an exact resume needs."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

from launch.runtime.config import ConfigError


class BatchStream:
    """Batches of ``make_loader(epoch)``, one epoch after the other.

    Batches of a :class:`mae.images.stream.ShardedImageSource` carry ``worker`` and ``pos`` (where each
    DataLoader worker's part of the epoch stands); the stream keeps the latest of each, so
    :meth:`state_dict` says exactly where training is, and after :meth:`load_state_dict` the
    epoch continues from there: every worker skips the records it had consumed (without decoding
    them) and the worker after the last one served comes first. Batches without these fields
    (any other loader) are replayed by count instead.

    A batch smaller than ``batch_size`` (the end of a worker's part) is not trained on: its skip
    counts are kept in :attr:`dropped` (``n_skipped``, ``n_broken_shards``, ``samples``) for the
    trainer to log.

    Args:
        dataset: the source, with ``set_epoch(epoch, start, first_worker)``, or None.
        make_loader: epoch -> an iterable of batches (a DataLoader over ``dataset``).
        batch_size: the micro-batch size.
        num_workers: the loader's worker processes (0 counts as 1 here).
    """

    def __init__(self, dataset: Any, make_loader: Callable[[int], Iterable], batch_size: int, num_workers: int):
        self.dataset, self.make_loader, self.batch_size = dataset, make_loader, batch_size
        self.num_workers = max(1, num_workers)
        self.epoch, self.positions, self.last_worker, self.served = 0, {}, None, 0
        self.dropped = {"n_skipped": 0, "n_broken_shards": 0, "samples": 0}
        self._it: Optional[Iterator] = None
        self._replay = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "positions": {str(k): v for k, v in self.positions.items()},
                "last_worker": self.last_worker, "served": self.served, "num_workers": self.num_workers,
                "dropped": dict(self.dropped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.served = state["epoch"], state["served"]
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self.last_worker, self.dropped = state["last_worker"], dict(state["dropped"])
        self._it = None

    def _start_epoch(self) -> None:
        if self.positions or self.served:  # resuming inside this epoch
            first = (self.last_worker + 1) % self.num_workers if self.last_worker is not None else 0
            self._replay = 0 if self.positions else self.served
        else:
            first, self._replay = 0, 0
        if self.dataset is not None:
            self.dataset.set_epoch(self.epoch, self.positions, first)
        self._it = iter(self.make_loader(self.epoch))

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self):
        while True:
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                if not self.served:
                    raise ConfigError(
                        "the data source yielded no full batch of train.micro_batch_size samples for this rank in a "
                        f"whole epoch ({self.dropped['samples']} samples in partial batches, "
                        f"{self.dropped['n_skipped']} missing or undecodable)") from None
                self.epoch, self.positions, self.last_worker, self.served, self._it = self.epoch + 1, {}, None, 0, None
                continue
            tracked = isinstance(batch, dict) and batch.get("pos") is not None
            if tracked:
                self.positions[int(batch["worker"])] = int(batch["pos"])
                self.last_worker = int(batch["worker"])
                if batch["size"] < self.batch_size:
                    for k in ("n_skipped", "n_broken_shards"):
                        self.dropped[k] += int(batch[k])
                    self.dropped["samples"] += int(batch["size"])
                    continue
            elif self._replay:  # already trained on before the resume
                self._replay -= 1
                continue
            self.served += 1
            return batch
