"""Batches of uint8 images from any ImageDataset, in the order a sampler gives.

In-memory datasets (and views of them) are gathered with one tensor index per batch, which is far
faster than per-item collation for small images; file datasets go through a DataLoader with workers.
Either way the sampler alone decides the order, so a resumed run sees the same batches.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader

from .base import ImageDataset


class BatchLoader:
    """Iterate ``(images uint8 [B,C,H,W], labels [B])`` over ``order`` (an iterable of indices)."""

    def __init__(self, dataset: ImageDataset, batch_size: int, order: Iterable[int] | None = None,
                 drop_last: bool = False, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.order = order if order is not None else range(len(dataset))
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        n = len(self.order)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        src = self.dataset.tensor_source()
        if src is not None and self.num_workers == 0:
            images, index_map = src
            labels = self.dataset.labels
            for batch in BatchSampler(self.order, self.batch_size, self.drop_last):  # type: ignore[arg-type]
                idx = torch.as_tensor(batch, dtype=torch.long)
                src_idx = idx if index_map is None else index_map[idx]
                x, y = images[src_idx], labels[idx]
                yield (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)
            return
        loader = DataLoader(self.dataset, batch_sampler=BatchSampler(self.order, self.batch_size, self.drop_last),  # type: ignore[arg-type]
                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                            persistent_workers=False)
        for x, y in loader:
            yield x, torch.as_tensor(y, dtype=torch.long)
