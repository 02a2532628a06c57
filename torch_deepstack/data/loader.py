"""PrefetchLoader: batches from a DeepstackDataset with several batched reads in flight, in one process.

The USRBIO way of feeding a GPU: no worker processes (no pickling, no shared-memory hand-off, no per-worker
clients), just the sampler's next `depth` batches submitted as asynchronous batched reads, yielded in order as
they complete, into pinned memory when asked. It suits large samples, where I/O rather than Python dominates;
for heavy per-sample decoding use DataLoader workers instead.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler

from torch_deepstack.data.dataset import DeepstackDataset


class PrefetchLoader:
    """Iterate batches of `dataset` with `depth` batched reads in flight.

    Either batch_size (+ shuffle/sampler/drop_last/generator, like DataLoader) or batch_sampler. Yields what
    `dataset.__getitems__` returns (a stacked tensor with batched=True); `collate_fn` is applied if given.
    `state_dict()` / `load_state_dict()` resume mid-epoch exactly when the sampler is deterministic (a seeded
    generator): the loader replays the batch sampler and skips the batches already yielded. A state taken after
    an epoch's last batch resumes at the start of the next epoch, as the uninterrupted run would continue."""

    def __init__(self, dataset: DeepstackDataset, batch_size: int | None = 1, *, shuffle: bool = False,
                 sampler: Sampler | None = None, batch_sampler: Sampler | None = None, drop_last: bool = False,
                 generator: torch.Generator | None = None, depth: int = 4, collate_fn=None):
        if not isinstance(dataset, DeepstackDataset):
            raise TypeError(f"dataset: expected a DeepstackDataset, got {type(dataset).__name__}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if batch_sampler is None:
            if batch_size is None or batch_size < 1:
                raise ValueError(f"batch_size must be >= 1 without a batch_sampler, got {batch_size}")
            if sampler is None:
                sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        elif shuffle or sampler is not None:
            raise ValueError("batch_sampler is exclusive with shuffle and sampler")
        self.dataset, self.batch_sampler, self.depth, self.collate_fn = dataset, batch_sampler, depth, collate_fn
        self.generator = generator
        self._yielded = 0
        self._skip = 0
        self._gen_state: torch.Tensor | None = None
        self._restore = False  # load_state_dict gave a generator state for the next __iter__
        self._epoch_done = False

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator:
        if self.generator is not None:
            if self._restore and self._gen_state is not None:
                self.generator.set_state(self._gen_state)  # the saved epoch's order (replayed or next)
            else:
                self._gen_state = self.generator.get_state()
        self._restore = self._epoch_done = False
        batches = iter(self.batch_sampler)
        for _ in range(self._skip):
            next(batches, None)
        self._yielded, self._skip = self._skip, 0
        inflight: deque = deque()
        end = object()
        nxt = next(batches, end)  # one batch of indices ahead: the last batch is known before it is yielded
        while True:
            while nxt is not end and len(inflight) < self.depth:
                inflight.append(self.dataset.submit(nxt))
                nxt = next(batches, end)
            if not inflight:
                break
            out = self._emit(inflight.popleft())
            # Set before the last yield: a state_dict() taken once the consumer has the last batch (whether or
            # not it asks for more) must mean "next epoch", not "this epoch, all yielded", which replays nothing.
            self._epoch_done = nxt is end and not inflight
            yield out
        self._epoch_done = True  # also an epoch with no batches at all

    def _emit(self, pending):
        out = pending.value()
        self._yielded += 1
        return out if self.collate_fn is None else self.collate_fn(out)

    def state_dict(self) -> dict:
        """Where the current epoch stands: batches yielded and the generator state it started from. Once the
        epoch's last batch was yielded: the start of the next epoch (0 yielded, the generator as it is now)."""
        if self._epoch_done:
            return {"yielded": 0, "generator": None if self.generator is None else self.generator.get_state()}
        return {"yielded": self._yielded, "generator": self._gen_state}

    def load_state_dict(self, state: dict) -> None:
        self._yielded = self._skip = int(state["yielded"])  # state_dict() before iterating gives it back
        self._gen_state = state.get("generator")
        self._restore, self._epoch_done = self._gen_state is not None, False
