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

from fewshot.schemas import algorithm_schemas, backbone_schemas, dataset_schemas, torch_schemas


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
    # off | on | auto: replay each meta-iteration as one CUDA graph (fewshot.engine.steps.GraphStep). auto: on CUDA
    # with an optimizer that is captured (adam, adamw), eager elsewhere or when capture fails. Measured on an
    # H100 (scripts/bench_gpu.sh): MAML Omniglot 5-way 1-shot 26.9 -> 3.6 ms per meta-iteration, 20-way 1-shot
    # 141.8 -> 26.6 ms (maml_omniglot_5w1s/20w1s shapes, same process).
    cuda_graph: str = "auto"


@dataclass
class EvalConfig:
    episodes: int = 600
    meta_batch_size: int = 25  # tasks per forward pass at test time (memory, not results)
    # Validation and test episodes may differ from training ones (ProtoNets train 60-way, test 5-way;
    # MAML's code tests with K queries per class). null: the same as episode.*
    ways: Optional[int] = None
    queries: Optional[int] = None
    # Replay validation and test batches as CUDA graphs (fewshot.engine.graphs.EvalGraphs), on CUDA only (a CPU
    # evaluates eagerly; a batch that cannot be captured says so in one line and runs eagerly). Measured on an H100
    # (scripts/bench_gpu.sh): fewshot-eval of a MAML Omniglot 5-way 1-shot model on 600 tasks, 10 inner steps,
    # 16.4 and 19.2 s without, 13.9 and 11.0 s with (whole processes), the same accuracy.
    cuda_graph: bool = True
    # Test with the final query logits of the N best validation checkpoints averaged (MAML++'s protocol; needs an
    # algorithm that reports its logits: maml_pp). 1: best.pt alone. fewshot.engine.ensemble.
    ensemble: int = 1
    # The weights the run's test reads: best (best.pt, validation's pick, as most papers' code tests) or last (the
    # final weights, as Reptile's reference code tests, which has no validation).
    weights: str = "best"


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto | cpu | cuda | cuda:N
    # Convolution weights (and so activations) in NHWC: null picks what scripts/bench_channels_last.py measured
    # faster (on a CPU for protonet, matching, siamese, reptile and anil; off elsewhere:
    # fewshot.device.use_channels_last); false turns it off, true on (refused on CUDA, unmeasured). A step agrees to
    # float rounding, not bit for bit, in either layout; a run may resume with another setting.
    channels_last: Optional[bool] = None
    # Keep freed memory in the process for the next step instead of glibc returning each block over 32 MB to the OS
    # (fewshot.device.keep_freed_memory): null is on for CPU runs under glibc; false leaves malloc as it is. Same
    # numbers either way.
    keep_freed_memory: Optional[bool] = None


@dataclass
class PaperConfig:
    """The published number an experiment preset reproduces (percent), for tables."""

    source: str = ""
    acc: Optional[float] = None
    ci95: Optional[float] = None
    # Sequence presets (MANN): the accuracy at the 1st, 2nd, ... instance of each class, null where the paper
    # has no column. RESULTS.md sets results' instance_acc beside it.
    instance_acc: Optional[list[Optional[float]]] = None


@dataclass
class RevisionConfig:
    """A value an experiment preset used to set: fewshot.ledger lists the runs that ended before `until` and record
    no value of their own for the key (results.json's config, from before it existed) as trained with `was`."""

    key: str = MISSING
    was: Any = None
    until: str = MISSING  # UTC, as results.json's date: 2026-11-29T07:00:00Z


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
    revisions: list[RevisionConfig] = field(default_factory=list)
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
    cuda_graph: Optional[bool] = None  # null: the training run's eval.cuda_graph
    compile_step: Optional[bool] = None  # null: the training run's algo.compile_step (MANN)
    # null: the training run's algo.eval_inner_steps (the Meta-LSTM's algo.eval_updates); N: the same weights tested
    # after N inner steps (MAML, first-order MAML, learn2learn's MAML, ANIL, Meta-SGD, Reptile, the Meta-LSTM, the
    # sinusoid pretrain baseline; not MAML++, sized for its training steps), e.g. a paper's 10 where the preset tests
    # after 5.
    inner_steps: Optional[int] = None


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


# Keys that name a choice but are not constructor arguments.
META_KEYS = ("name",)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    for group, name, node in (
        ("device", "device_schema", DeviceConfig),
        ("trainer", "trainer_schema", TrainerConfig),
    ):
        cs.store(name=f"schema_{group}_{name.removesuffix('_schema')}", node=node)
    # Algorithms and backbones: schemas generated from their constructors (fewshot.schemas).
    for name, node in algorithm_schemas():
        cs.store(name=f"schema_algo_{name}", node=node)
    for name, node in dataset_schemas():
        cs.store(name=f"schema_dataset_{name}", node=node)
    for name, node in backbone_schemas():
        cs.store(name=f"schema_backbone_{name}", node=node)
    for group, name, node in torch_schemas():
        cs.store(name=f"schema_{group}_{name}", node=node)
