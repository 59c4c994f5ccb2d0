"""Device-resident splits and a seeded, resumable, per-rank batch order.

The whole data set (150 MB as uint8) lives on the training device; a batch is an
index into it, so there are no loader processes and no host-device copies per
step. Every rank draws the same seeded permutation per epoch and takes a disjoint
slice of it, so DDP ranks see disjoint shards and the order is reproducible and
resumable from `state_dict()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarray.data.cifar import Cifar100, Split, channel_stats, validation_split
from cifarray.config import check_batch_split
from cifarray.errors import UserError


@dataclass
class DeviceSplit:
    images: torch.Tensor  # (N, 3, 32, 32) uint8 on the device
    labels: torch.Tensor  # (N,) int64 fine labels on the device

    @classmethod
    def from_split(cls, split: Split, device: torch.device | str) -> "DeviceSplit":
        return cls(torch.from_numpy(np.ascontiguousarray(split.images)).to(device),
                   torch.from_numpy(split.fine_labels).to(device))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class PreparedData:
    train: DeviceSplit
    val: DeviceSplit
    test: DeviceSplit  # for the final evaluation only; never for model selection
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]


def prepare(data: Cifar100, *, val_size: int = 5000, seed: int = 0,
            device: torch.device | str = "cpu") -> PreparedData:
    """Carve the seeded validation split from train, compute normalisation stats on what remains, move to device."""
    train_idx, val_idx = validation_split(len(data.train), val_size, seed)
    train = data.train.subset(train_idx)
    mean, std = channel_stats(train.images)
    return PreparedData(
        train=DeviceSplit.from_split(train, device),
        val=DeviceSplit.from_split(data.train.subset(val_idx), device),
        test=DeviceSplit.from_split(data.test, device),
        mean=mean,
        std=std,
        class_names=data.fine_names,
    )


class ShardedBatches:
    """Indices of this rank's batches, epoch after epoch, from one seeded permutation shared by all ranks.

    The permutation is drawn on the CPU, so the order does not depend on the device (a run resumed on
    another kind of device trains on the same batches), and moved to `device` once per epoch: a batch
    is then a slice of a device tensor, with no host-to-device copy per step.
    """

    def __init__(self, n: int, global_batch: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu"):
        check_batch_split(global_batch, world, f"batch size {global_batch} must be divisible by the number of "
                          f"workers ({world})", "change one of them")
        self.per_rank = global_batch // world
        if n // world < self.per_rank:
            raise UserError(f"batch size {global_batch} exceeds the {n} training images; use a smaller --batch-size")
        self.n, self.rank, self.world, self.seed, self.device = n, rank, world, seed, torch.device(device)
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return (self.n // self.world) // self.per_rank  # incomplete last batches are dropped

    def _epoch_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        shard = self.n // self.world
        # Disjoint contiguous slices of one permutation.
        return perm[self.rank * shard:(self.rank + 1) * shard].to(self.device)

    def next(self) -> torch.Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        self.position += 1
        return self.span(self.position - 1, self.position)

    def last(self) -> tuple[int, int]:
        """(epoch, position in the epoch) of the batch `next()` returned last."""
        return self.epoch, self.position - 1

    def span(self, first: int, stop: int) -> torch.Tensor:
        """This rank's indices of the current epoch's batches first..stop-1, concatenated."""
        if self._order is None:
            self._order = self._epoch_order()
        return self._order[first * self.per_rank:stop * self.per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def data_identity(folder: Path) -> tuple:
    """What a data folder's content is known by without reading it: its path and, per file, inode, size and
    mtime (a set rewritten in place, or another set at the same path, has another identity)."""
    folder = Path(folder).resolve()
    names = ("train", "test", "meta")
    # Every place `cifar.locate` looks: the folder itself, its cifar-100-python/, the tarball beside it, or a tarball.
    files = [folder, folder / "cifar-100-python.tar.gz", *(folder / n for n in names),
             *(folder / "cifar-100-python" / n for n in names)]
    seen = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        if f.is_file():
            seen.append((str(f.relative_to(folder)) if f != folder else "", st.st_ino, st.st_size, st.st_mtime_ns))
    return (str(folder), tuple(seen))


def random_data(n: int, device: torch.device | str = "cpu", seed: int = 0) -> PreparedData:
    """`n` random uint8 training images (256 each for val and test) in the splits' layout, on `device`: for timings
    (a step's cost does not depend on the pixels) and for tests of a family's pieces."""
    g = torch.Generator().manual_seed(seed)

    def split(k: int) -> DeviceSplit:
        return DeviceSplit(torch.randint(0, 256, (k, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
                           torch.randint(0, 100, (k,), generator=g).to(device))

    return PreparedData(train=split(n), val=split(256), test=split(256), mean=(0.5,) * 3, std=(0.25,) * 3,
                        class_names=[str(i) for i in range(100)])
