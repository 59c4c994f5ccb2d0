"""A run's data source: where its images are, whether they are checked, and how its validation split is carved.

One validated value that train, eval and tune share. A training config gives its own with
`CommonConfig.data_source()`; `python -m cifarray.eval` reads one back from a run's config.json
(`DataSource.of(values, run_folder)`); the tuner builds one for a sweep's shared data folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cifarray.errors import UserError

PROCEDURAL_NAME = "the procedural data set"


@dataclass(frozen=True)
class Procedural:
    """The settings of a procedural set (cifarray.data.synth): what writes it, and what identifies it."""

    train_per_class: int
    test_per_class: int
    seed: int
    difficulty: str

    def __post_init__(self) -> None:
        from cifarray.data.synth import DIFFICULTIES

        for name in ("train_per_class", "test_per_class"):
            if getattr(self, name) < 1:
                raise UserError(f"--synthetic-{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.difficulty not in DIFFICULTIES:
            raise UserError(f"--synthetic-difficulty {self.difficulty!r} is not one of {', '.join(DIFFICULTIES)}")


@dataclass(frozen=True)
class DataSource:
    folder: Path  # the CIFAR-100 files: the user's --data-dir, or a procedural set's folder (a run's RUN/data)
    procedural: Procedural | None  # None: the user's data
    verify: bool  # check the files' md5 sums (the user's data, unless --no-verify)
    val_size: int  # validation images carved from train
    seed: int  # of the validation split

    def __post_init__(self) -> None:
        if self.val_size < 0:
            raise UserError(f"--val-size must be at least 0, got {self.val_size}")

    @classmethod
    def of(cls, values: dict[str, Any], run_folder: str | Path) -> "DataSource":
        """From a training config's values (a config, or a run's config.json): procedural data lives in the run's
        own data folder, the user's in data_dir."""
        from cifarray.rundir import RunDir

        if values.get("synthetic"):
            procedural = Procedural(train_per_class=values["synthetic_train_per_class"],
                                    test_per_class=values["synthetic_test_per_class"], seed=values["seed"],
                                    difficulty=values["synthetic_difficulty"])
            return cls(RunDir(run_folder).data, procedural, False, values["val_size"], values["seed"])
        if not values.get("data_dir"):
            raise UserError("no data given: pass --data-dir DIR (real CIFAR-100) or --synthetic (procedural data)")
        return cls(Path(values["data_dir"]).expanduser(), None, not values.get("no_verify"), values["val_size"],
                   values["seed"])

    @property
    def name(self) -> str:
        """How errors name it."""
        return PROCEDURAL_NAME if self.procedural else str(self.folder)

    def write(self) -> None:
        """Write the procedural set into its folder (once; cached across runs); the user's data is never written."""
        from cifarray.data.synth import synthetic_for_run

        if self.procedural:
            p = self.procedural
            synthetic_for_run(self.folder, train_per_class=p.train_per_class, test_per_class=p.test_per_class,
                              seed=p.seed, difficulty=p.difficulty)

    def load(self):
        """The whole set (cifarray.data.cifar.Cifar100), loaded safely and checked."""
        from cifarray.data.cifar import load_cifar100

        return load_cifar100(self.folder, verify=self.verify)

    def prepare(self, device="cpu"):
        """The splits on `device`: the seeded validation split carved out, normalisation statistics."""
        from cifarray.data.loader import prepare

        return prepare(self.load(), val_size=self.val_size, seed=self.seed, device=device)

    def training_images(self) -> int:
        """Training images before the validation split: the user's data is loaded whole (md5 unless --no-verify,
        structure), so that it fails here, with the file named, not in a worker; a procedural set is counted from
        its settings before it is written."""
        from cifarray.data.cifar import NUM_FINE

        if self.procedural:
            return self.procedural.train_per_class * NUM_FINE
        return len(self.load().train)

    def check_fits(self, batch_size: int, workers: int, n_train: int | None = None,
                   flag: Callable[[str], str] | None = None) -> None:
        """The validation split, the batch and each worker's shard must fit the data: checked before Ray starts.
        `flag` names a setting the way the user gave it (a CLI flag, or a sweep-file key)."""
        from cifarray.config import flag_of

        flag = flag or flag_of
        n_train = self.training_images() if n_train is None else n_train
        val, batch = flag("val_size"), flag("batch_size")
        if not self.val_size < n_train:
            raise UserError(f"{val} {self.val_size} leaves no training images: {self.name} has {n_train:,} training "
                            f"images; lower {val} below {n_train} (e.g. {n_train // 10})")
        left = n_train - self.val_size
        workers = workers or 1
        shard, per_worker = left // workers, batch_size // workers
        if per_worker > shard:
            where = f"{shard:,} per worker for {workers} workers, of the " if workers > 1 else ""
            raise UserError(f"{batch} {batch_size} is larger than the training images ({where}{left:,} left of "
                            f"{self.name}'s {n_train:,} after the {self.val_size:,} validation images); lower {batch} "
                            f"or {val}")
