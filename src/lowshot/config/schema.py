"""The typed config tree: one dataclass per section, defaults as in the docs (docs/config.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any





@dataclass
class DataConfig:
    """Which dataset and splits to use. ``options`` go to the dataset reader as keywords."""

    name: str = "fashion_mnist"
    root: str | None = None
    train_split: str = "base"
    test_split: str | None = "base_test"  # held-out images of the training classes
    val_split: str | None = "val"  # classes for few-shot validation episodes
    novel_split: str | None = "novel"
    image_size: int | None = None  # None: the reader's default
    download: bool = False
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AffineConfig:
    """Random affine warp per sample (``lowshot.data.transforms.RandomAffine``); zeros = off.

    ``degrees``/``shear``/``translate``: half-widths of symmetric ranges (degrees, degrees,
    fraction of the image side); ``scale``: [lo, hi] zoom.
    """

    degrees: float = 0.0
    translate: float = 0.0
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    shear: float = 0.0
    padding_mode: str = "zeros"  # zeros | border | reflection


@dataclass
class AugmentConfig:
    """Batch augmentation applied on the training device (see ``lowshot.data.transforms``)."""

    crop_scale: list[float] | None = field(default_factory=lambda: [0.6, 1.0])
    flip: bool = True
    jitter: float = 0.0
    affine: AffineConfig = field(default_factory=AffineConfig)
    mean: list[float] | None = None  # None: the dataset's default statistics
    std: list[float] | None = None


@dataclass
class ModelConfig:
    backbone: str = "conv4"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadConfig:
    """Classifier head; ``scale`` None keeps the head's own default."""

    name: str = "cosine"
    margin: float = 0.0
    scale: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    """Per-step learning-rate schedule: linear warmup, then cosine / multistep / constant."""

    name: str = "cosine"  # cosine | multistep | constant
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1  # warmup starts at lr * warmup_start
    milestones: list[int] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # GLOBAL batch: split evenly over the processes of a multi-process run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    sampler: str = "instance"
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)
    amp: str | bool = "off"  # off | bf16 | fp16 (YAML reads a bare `off` as false: accepted) (autocast; fp16 needs CUDA, bf16 also runs on CPU)
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = None
    checkpoint_every: int = 0  # also save last.pt every N steps (0: only at epoch ends)
    max_steps_per_epoch: int | None = None  # cap for quick runs
    max_steps: int | None = None  # stop this launch after N global steps, as if interrupted (a resume drops it)
    eval_batch_size: int = 256
    progress: bool = True
    sync_bn: bool = False  # multi-process: BatchNorm statistics over the global batch (docs/distributed.md)
    nan_check_every: int = 50  # steps between finiteness checks (each costs a GPU sync); always before saving
    tensorboard: bool = False  # also write TensorBoard event files to RUN_DIR/tensorboard/ (docs/runs.md)


@dataclass
class ValConfig:
    """Few-shot validation during training (mmfewshot's best_accuracy_mean model selection)."""

    every: int = 1  # epochs; 0 disables
    episodes: int = 100
    way: int = 5
    shot: int = 1
    query: int = 15
    method: str = "finetune"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    within: str | None = None  # class-metadata key (e.g. alphabet): each episode's classes share its value


@dataclass
class EvalConfig:
    """Few-shot test protocol used by ``lowshot eval`` / the demo when not given on the CLI."""

    way: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    query: int = 15
    episodes: int = 2000
    method: str = "finetune"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    within: str | None = None  # class-metadata key (e.g. alphabet): within-group episodes (docs/fewshot.md)


@dataclass
class Config:
    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
