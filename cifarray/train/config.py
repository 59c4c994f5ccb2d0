"""The validated configs of the two training jobs, with every default explained.

DenseNet recipe (defaults): the paper's 10,000 steps at batch 512 with AugMix, and its
model (preset `paper`, 99,735 parameters). Optimiser: SGD with Nesterov momentum 0.9,
weight decay 5e-4, one-cycle schedule (15 % linear warm-up, cosine decay to ~0), which
scales with --steps. Chosen by measurement: on procedural data, 150 steps at batch 128
(DenseNet k=4, blocks 2,2,2), SGD reached 36 % test accuracy vs 20 % for AdamW at lr
3e-3 with the same schedule (docs/BENCHMARKS.md); SGD + cosine is also the standard
DenseNet-on-CIFAR recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from cifarray.config import check_batch_split, embed, flag_of, opt
from cifarray.data.augment import MODES, AugmentConfig
from cifarray.data.source import DataSource
from cifarray.errors import UserError
from cifarray.models.dcgan import DCGANConfig
from cifarray.models.densenet import DenseNetConfig
from cifarray.train import graphs

PRECISIONS = ("auto", "bf16", "fp32")
# Component config field -> the training config's flat key (flags, TOML, sweep files, config.json).
DENSENET_KEYS = ("growth_rate", "blocks", "init_channels", "bottleneck", "compression", "dropout")
AUGMENT_KEYS = {"mode": "augment", "pad": "crop_pad", "flip": "flip", "severity": "augmix_severity",
                "width": "augmix_width", "depth": "augmix_depth", "alpha": "augmix_alpha"}
DCGAN_KEYS = ("z_dim", "g_widths", "d_widths", "d_batchnorm", "spectral_norm")


@dataclass(frozen=True)
class CommonConfig:
    data_dir: str | None = opt(None, "folder holding cifar-100-python/ or its .tar.gz")
    synthetic: bool = opt(False, "use procedural CIFAR-format data (written into OUT/data) instead of --data-dir")
    synthetic_train_per_class: int = opt(500, "procedural training images per class")
    synthetic_test_per_class: int = opt(100, "procedural test images per class")
    synthetic_difficulty: str = opt("hard", "procedural data: hard (does not saturate: 20 groups of 5 look-alike "
                                            "classes, clutter, occlusion) or easy (tests loaders, ~100 % quickly)")
    no_verify: bool = opt(False, "skip the md5 check of --data-dir (structure is still validated)")
    steps: int = opt(10_000, "optimizer steps in total (the run ends at exactly this step)")
    batch_size: int = opt(512, "global batch, split evenly across workers")
    workers: int = opt(1, "Ray Train workers (DDP ranks)")
    cpus_per_worker: int | None = opt(None, "CPUs (and torch threads) per worker; default: OMP_NUM_THREADS if set, "
                                            "else all CPUs / workers")
    gpu: bool = opt(False, "one GPU per worker (channels_last)")
    precision: str = opt("auto", "auto | bf16 | fp32: auto is bf16 autocast where the hardware computes bf16 "
                                 "natively (GPUs; CPUs with AMX or AVX512-BF16), else fp32")
    compile: bool = opt(False, "torch.compile the model (costs start-up time: ~30 s on 2 CPU cores)")
    cuda_graphs: str = opt("auto", "auto | on | off: replay the whole training step (forward, backward, optimizer) "
                                   "from one captured CUDA graph; needs --gpu, one worker, no --compile (densenet: "
                                   "--optimizer sgd). auto: on where a GPU run has shown that the model's graphed "
                                   "step trains like eager (densenet; not yet dcgan: docs/BENCHMARKS.md)")
    out: str = opt("runs/train", "run folder: config, metrics.csv, checkpoints, summary.json")
    seed: int = opt(0, "seed of initialisation, data order and augmentation")
    val_size: int = opt(5000, "validation images carved from train (model selection; test is used once)")
    log_every: int = opt(50, "steps between metric rows (and NaN checks)")
    eval_every: int = opt(500, "steps between validation evaluations")
    checkpoint_every: int = opt(500, "steps between checkpoints (resume points)")
    max_failures: int = opt(3, "worker-group restarts from the last checkpoint before giving up")
    param_budget: int | None = opt(None, "trainable-parameter budget (default: 100,000 classifier, 1,000,000 GAN)")

    def __post_init__(self) -> None:
        if self.synthetic and self.data_dir:
            raise UserError("--synthetic and --data-dir exclude each other; pass one")
        self.data_source()  # the data settings (and that there are data), checked where they are one value
        for name in ("steps", "batch_size", "workers", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{flag_of(name)} must be at least 1, got {getattr(self, name)}")
        check_batch_split(self.batch_size, self.workers, f"--batch-size {self.batch_size} must be divisible by "
                          f"--workers {self.workers}", "change one of them")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.max_failures < -1:
            raise UserError("--max-failures must be -1 (unlimited) or >= 0")
        if self.cuda_graphs not in graphs.MODES:
            raise UserError(f"--cuda-graphs {self.cuda_graphs!r} is not one of {', '.join(graphs.MODES)}")
        if self.cuda_graphs == "on":
            use, why = self.graphs()
            if not use:
                raise UserError(f"--cuda-graphs on cannot be used here ({why}): graphs need --gpu, --workers 1 and "
                                "no --compile (densenet: --optimizer sgd); pass --cuda-graphs off or auto")

    def data_source(self) -> DataSource:
        """Where this run's images come from and how its validation split is carved."""
        return DataSource.of(vars(self), self.out)

    def graphs(self, cuda: bool | None = None, workers: int | None = None) -> tuple[bool, str]:
        """(use CUDA graphs, why not) for this config, on a device that is CUDA or not (default: --gpu)."""
        return graphs.resolve(self.cuda_graphs, cuda=self.gpu if cuda is None else cuda,
                              workers=self.workers if workers is None else workers, compiled=self.compile,
                              unsupported=self.graphs_unsupported(), validated=self.graphs_validated)

    def graphs_unsupported(self) -> str:
        return ""

    # Whether --cuda-graphs auto captures this family's step: set where a GPU run of the same seed, graphed and
    # eager, trained alike (docs/BENCHMARKS.md).
    graphs_validated: ClassVar[bool] = False

    def model_config(self) -> Any:
        """The model this config trains (a family's config says which)."""
        raise NotImplementedError

    # The parameter budget, owned by the model config (cifarray.models.budget.enforce_budget): its count, the
    # budget (--param-budget, else the model's default) and what to change when over it.
    def param_count(self) -> int:
        return self.model_config().param_count()

    @property
    def budget(self) -> int:
        return self.model_config().budget if self.param_budget is None else self.param_budget

    def over_budget(self, count: int, budget: int) -> str:
        return self.model_config().over_budget(count, budget)


@dataclass(frozen=True)
class DenseNetTrainConfig(CommonConfig):
    out: str = opt("runs/densenet", "run folder: config, metrics.csv, checkpoints, summary.json")
    lr: float = opt(0.2, "peak learning rate of the one-cycle schedule (SGD)")
    optimizer: str = opt("sgd", "sgd (Nesterov, momentum 0.9) or adamw")
    weight_decay: float = opt(5e-4, "L2 weight decay")
    warmup: float = opt(0.15, "fraction of steps of linear warm-up")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy")
    # The model's and the augmentation's settings, flat (--growth-rate, --augmix-severity, ...); their
    # defaults and help live once, in DenseNetConfig and AugmentConfig.
    growth_rate: int = embed(DenseNetConfig, "growth_rate")
    blocks: tuple[int, ...] = embed(DenseNetConfig, "blocks")
    init_channels: int | None = embed(DenseNetConfig, "init_channels")
    bottleneck: bool = embed(DenseNetConfig, "bottleneck")
    compression: float = embed(DenseNetConfig, "compression")
    dropout: float = embed(DenseNetConfig, "dropout")
    augment: str = embed(AugmentConfig, "mode")
    crop_pad: int = embed(AugmentConfig, "pad")
    flip: bool = embed(AugmentConfig, "flip")
    augmix_severity: int = embed(AugmentConfig, "severity")
    augmix_width: int = embed(AugmentConfig, "width")
    augmix_depth: int = embed(AugmentConfig, "depth")
    augmix_alpha: float = embed(AugmentConfig, "alpha")
    augment_chunk: int = opt(0, "training batches augmented per call: one call's kernel launches and host syncs "
                                "serve them all; 0: as many as fit in 1 GiB of augmentation memory, at most an "
                                "epoch (the draws depend on it: resume with the same value)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.augment not in MODES:
            raise UserError(f"--augment {self.augment!r} is not one of {', '.join(MODES)}")
        self.augment_config()  # validates --crop-pad and the --augmix-* settings
        if self.augment_chunk < 0:
            raise UserError(f"--augment-chunk must be 0 (auto) or a number of batches, got {self.augment_chunk}")
        if self.optimizer not in ("sgd", "adamw"):
            raise UserError(f"--optimizer {self.optimizer!r} is not sgd or adamw")
        if self.lr <= 0 or not 0 <= self.warmup < 1 or not 0 <= self.label_smoothing < 1:
            raise UserError("--lr must be > 0, --warmup and --label-smoothing in [0, 1)")
        self.model_config()  # validates the architecture now, before Ray starts

    def graphs_unsupported(self) -> str:
        return "" if self.optimizer == "sgd" else f"--optimizer {self.optimizer}"

    # The paper recipe's 10,000 steps on an H200, same seed and data: test 0.9529 graphed, 0.9524 eager
    # (docs/BENCHMARKS.md, "Issue 35, seventh part").
    graphs_validated: ClassVar[bool] = True

    def model_config(self) -> DenseNetConfig:
        return DenseNetConfig(**{name: getattr(self, name) for name in DENSENET_KEYS})

    def augment_config(self) -> AugmentConfig:
        """What the trainer and the plain-loop baseline both augment with (one place, so they cannot drift)."""
        return AugmentConfig(**{name: getattr(self, key) for name, key in AUGMENT_KEYS.items()})


@dataclass(frozen=True)
class DCGANTrainConfig(CommonConfig):
    out: str = opt("runs/dcgan", "run folder: config, metrics.csv, samples, checkpoints, summary.json")
    steps: int = opt(50_000, "optimizer steps of each network (the paper's 50k)")
    batch_size: int = opt(128, "global batch of real images, split across workers")
    lr_g: float = opt(2e-4, "generator Adam learning rate (DCGAN paper)")
    lr_d: float = opt(2e-4, "discriminator Adam learning rate (DCGAN paper)")
    beta1: float = opt(0.5, "Adam beta1 (DCGAN paper)")
    z_dim: int = embed(DCGANConfig, "z_dim")
    g_widths: tuple[int, ...] = embed(DCGANConfig, "g_widths")
    d_widths: tuple[int, ...] = embed(DCGANConfig, "d_widths")
    loss: str = opt("bce", "bce (the paper's sigmoid + BCE) or hinge")
    label_smoothing: float = opt(0.1, "one-sided: real targets are 1 - s (bce only)")
    label_noise: float = opt(0.0, "std of Gaussian noise added to the real targets (bce only)")
    spectral_norm: bool = embed(DCGANConfig, "spectral_norm")
    d_batchnorm: bool = embed(DCGANConfig, "d_batchnorm")
    ema: float = opt(0.0, "decay of an EMA of generator weights used for samples (0 = off, e.g. 0.999)")
    flip: bool = opt(True, "random horizontal flips of real images")
    eval_every: int = opt(1000, "steps between sample grids")
    fid_every: int = opt(0, "steps between FID evaluations while training (0: every --eval-every when Inception "
                            "weights are available; -1: off)")
    fid_samples: int = opt(2000, "generated samples per FID during training (python -m cifarray.eval fid: 10,000)")
    inception_weights: str | None = opt(None, "Inception weights file for FID (else torch hub's cache)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("bce", "hinge"):
            raise UserError(f"--loss {self.loss!r} is not bce or hinge")
        if min(self.lr_g, self.lr_d) <= 0 or not 0 <= self.beta1 < 1 or not 0 <= self.ema < 1:
            raise UserError("--lr-g/--lr-d must be > 0, --beta1 and --ema in [0, 1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError("--label-smoothing must be in [0, 0.5)")
        if self.fid_every < -1 or self.fid_samples < 2:
            raise UserError("--fid-every must be -1, 0 or a step count, and --fid-samples at least 2")
        self.model_config()

    def model_config(self) -> DCGANConfig:
        return DCGANConfig(**{name: getattr(self, name) for name in DCGAN_KEYS})
