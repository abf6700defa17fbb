"""Typed schemas for the Hydra config tree, so a misspelled key fails at compose time.

Each YAML file in conf/<group>/ starts from its schema (e.g. `- /schema_dataset_omniglot@_here_`; schemas are
stored as root configs, not groups, so that `--help` lists only the groups a user chooses;
algorithms and backbones take theirs from their constructors, see fewshot.schemas),
and conf/train.yaml / conf/eval.yaml start from `train_schema` / `eval_schema`. The group
directories stay the only registry of choices; these dataclasses only fix the keys and types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fewshot.schemas import algorithm_schemas, backbone_schemas, torch_schemas


@dataclass
class EpisodeConfig:
    ways: int = 5
    shots: int = 1
    queries: int = 15


@dataclass
class TrainerConfig:
    meta_batch_size: int = 32
    iterations: int = 60000
    meta_lr: float = 1e-3
    val_every: int = 500  # validate (and write metrics.csv, best.pt) every N iterations
    val_episodes: int = 200  # fixed validation tasks
    checkpoint_every: int = 500  # write checkpoints/last.pt every N iterations
    log_every: int = 10  # refresh the progress bar's loss/accuracy every N iterations
    grad_clip: Optional[float] = None


@dataclass
class EvalConfig:
    episodes: int = 600
    meta_batch_size: int = 25  # tasks per forward pass at test time (memory, not results)
    # Validation and test episodes may differ from training ones (ProtoNets train 60-way, test 5-way;
    # MAML's code tests with K queries per class). null: the same as episode.*
    ways: Optional[int] = None
    queries: Optional[int] = None


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class PaperConfig:
    """The published number an experiment preset reproduces (percent), for tables."""

    source: str = ""
    acc: Optional[float] = None
    ci95: Optional[float] = None


@dataclass
class TrainConfig:
    algo: Any = MISSING
    backbone: Any = MISSING
    dataset: Any = MISSING
    optim: Any = MISSING
    schedule: Any = MISSING
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)
    seed: int = 0
    data_root: str = "${oc.env:FEWSHOT_DATA_ROOT,./data}"
    cache_dir: str = "${oc.env:FEWSHOT_CACHE_DIR,${oc.env:HOME,.}/.cache/fewshot}"
    name: str = "${algo.name}_${dataset.name}_${episode.ways}w${episode.shots}s"
    dry_run: bool = False  # build data and models, print the config, stop before training
    resume: bool = False  # continue from checkpoints/last.pt (also automatic when the run folder holds one)
    logger: Optional[str] = None  # tensorboard: also log metrics to <run>/tensorboard (metrics.csv always)


@dataclass
class EvalOverrides:
    episodes: Optional[int] = None  # null: the training run's eval.episodes
    meta_batch_size: Optional[int] = None


@dataclass
class EvalRunConfig:
    """fewshot-eval: the run comes from the checkpoint; these settings may override parts of it."""

    checkpoint: str = MISSING
    device: DeviceConfig = field(default_factory=DeviceConfig)
    eval: EvalOverrides = field(default_factory=EvalOverrides)
    seed: Optional[int] = None  # null: the training run's seed (reproduces its test number)
    split: str = "test"
    benchmark: Optional[str] = None  # lake_runs: Lake et al.'s 20 original one-shot runs instead of sampled tasks
    # `algo=X` / `backbone=Y` on the command line: what the checkpoint must hold; a mismatch is refused.
    algo: Any = None
    backbone: Any = None
    data_root: str = "${oc.env:FEWSHOT_DATA_ROOT,./data}"
    cache_dir: str = "${oc.env:FEWSHOT_CACHE_DIR,${oc.env:HOME,.}/.cache/fewshot}"
    name: str = "eval"


# ---- group schemas -------------------------------------------------------------------------------


@dataclass
class OmniglotConfig:
    _target_: str = "fewshot.data.omniglot.load_omniglot"
    name: str = "omniglot"
    root: str = "${data_root}/omniglot"
    cache_dir: str = "${cache_dir}"
    image_size: int = 28
    split: str = "finn"  # finn | vinyals
    split_seed: int = 1
    download: bool = True
    base_url: str = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
    splits_url: str = (
        "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals"
    )


@dataclass
class SyntheticConfig:
    _target_: str = "fewshot.data.synthetic.load_synthetic"
    name: str = "synthetic"
    train_classes: int = 64
    val_classes: int = 16
    test_classes: int = 20
    images_per_class: int = 20
    image_size: int = 28
    channels: int = 1
    noise: float = 0.25
    seed: int = 0


@dataclass
class SinusoidConfig:
    _target_: str = "fewshot.data.sinusoid.load_sinusoid"
    name: str = "sinusoid"
    amplitude: list = field(default_factory=lambda: [0.1, 5.0])
    phase: list = field(default_factory=lambda: [0.0, 3.141592653589793])
    x_range: list = field(default_factory=lambda: [-5.0, 5.0])


# Image datasets: mean/std have no schema default; each YAML in conf/dataset/ sets them and cites the source.
@dataclass
class ImageDatasetConfig:
    """What every downloadable image dataset takes; subclasses set the target, folder and size."""

    _target_: str = MISSING
    name: str = MISSING
    root: str = MISSING
    cache_dir: str = "${cache_dir}"
    format: str = "pickle"
    image_size: int = 84
    url: Optional[str] = None  # optional download with an md5 check
    md5: Optional[str] = None
    mean: list = MISSING
    std: list = MISSING


@dataclass
class MiniImageNetConfig(ImageDatasetConfig):
    _target_: str = "fewshot.data.miniimagenet.load_miniimagenet"
    name: str = "miniimagenet"
    root: str = "${data_root}/miniimagenet"
    format: str = "pickle"  # pickle | csv
    split_dir: Optional[str] = "${data_root}/miniimagenet/splits/ravi"
    images_per_class: int = 600


@dataclass
class CifarFSConfig(ImageDatasetConfig):
    _target_: str = "fewshot.data.cifar.load_cifar_fs"
    name: str = "cifar_fs"
    root: str = "${data_root}/cifar100"
    split_dir: str = "${data_root}/cifar-fs/splits"
    image_size: int = 32
    images_per_class: int = 600


@dataclass
class FC100Config(ImageDatasetConfig):
    _target_: str = "fewshot.data.cifar.load_fc100"
    name: str = "fc100"
    root: str = "${data_root}/cifar100"
    image_size: int = 32
    images_per_class: int = 600


@dataclass
class TieredImageNetConfig(ImageDatasetConfig):
    _target_: str = "fewshot.data.tiered.load_tieredimagenet"
    name: str = "tieredimagenet"
    root: str = "${data_root}/tieredimagenet"
    format: str = "pickle"  # pickle ({split}_images_png.pkl) | npz ({split}_images.npz)
    classes_per_split: Optional[list] = field(default_factory=lambda: [351, 97, 160])  # null: no check
    npz_channel_order: str = "rgb"  # rgb | bgr (npz written by cv2.imdecode hold BGR)


# Keys that name a choice but are not constructor arguments.
META_KEYS = ("name",)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    for group, name, node in (
        ("dataset", "omniglot_schema", OmniglotConfig),
        ("dataset", "synthetic_schema", SyntheticConfig),
        ("dataset", "sinusoid_schema", SinusoidConfig),
        ("dataset", "miniimagenet_schema", MiniImageNetConfig),
        ("dataset", "cifar_fs_schema", CifarFSConfig),
        ("dataset", "fc100_schema", FC100Config),
        ("dataset", "tieredimagenet_schema", TieredImageNetConfig),
        ("device", "device_schema", DeviceConfig),
        ("trainer", "trainer_schema", TrainerConfig),
    ):
        cs.store(name=f"schema_{group}_{name.removesuffix('_schema')}", node=node)
    # Algorithms and backbones: schemas generated from their constructors (fewshot.schemas).
    for name, node in algorithm_schemas():
        cs.store(name=f"schema_algo_{name}", node=node)
    for name, node in backbone_schemas():
        cs.store(name=f"schema_backbone_{name}", node=node)
    for group, name, node in torch_schemas():
        cs.store(name=f"schema_{group}_{name}", node=node)
