"""Every paper preset composes with its own protocol and runs one smoke iteration on synthetic data."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf

from conftest import group_choices, load_script
from fewshot import engine
from fewshot.engine.results import settings_record
from fewshot.ledger import load_presets, trained_with
from fewshot.train import run as train_run

# The sinusoid regression presets (<algo>_sinusoid_k<K>) have their own protocol and smoke test: tests/test_sinusoid.py.
PRESETS = [p for p in group_choices("experiment") if "_sinusoid_" not in p]
# An optional benchmark between the dataset and the cell: siamese_omniglot_lake_20w1s (read on Lake's 20 runs).
# Or <W>way: the sequence tasks of MANN and its LSTM baseline (mann_omniglot_5way: 10 instances per class, no shots).
NAME = re.compile(
    r"^(?P<algo>[a-z_]+)_(?P<dataset>omniglot|miniimagenet)_(?:lake_)?(?P<ways>\d+)(?:w(?P<shots>\d+)s|way)$"
)


def test_every_cell_of_the_issue_has_a_preset():
    cells = [f"{w}w{k}s" for w in (5, 20) for k in (1, 5)]
    expected = {f"{a}_omniglot_{c}" for a in ("maml", "fomaml", "matching", "matching_fce", "protonet") for c in cells}
    expected |= {
        f"{a}_miniimagenet_5w{k}s" for a in ("maml", "fomaml", "matching", "matching_fce", "protonet") for k in (1, 5)
    }
    expected |= {f"siamese_omniglot_{c}" for c in cells} | {"siamese_omniglot_lake_20w1s"}
    expected |= {"mann_omniglot_5way", "lstm_baseline_omniglot_5way"}
    expected |= {f"meta_lstm_{d}_5w{k}s" for d in ("omniglot", "miniimagenet") for k in (1, 5)}
    expected |= {f"meta_sgd_omniglot_{c}" for c in cells} | {f"meta_sgd_miniimagenet_5w{k}s" for k in (1, 5)}
    expected |= {f"maml_pp_omniglot_{c}" for c in cells}
    expected |= {f"anil_omniglot_20w{k}s" for k in (1, 5)} | {f"anil_miniimagenet_5w{k}s" for k in (1, 5)}
    assert expected <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_protocol(compose_cfg, preset):
    cfg = compose_cfg("train", [f"experiment={preset}"])
    m = NAME.match(preset)
    assert m, f"{preset} is not named <algo>_<dataset>_<W>w<K>s"
    assert cfg.name == preset
    assert cfg.algo.name == m["algo"] and cfg.dataset.name == m["dataset"]
    # The test episodes are the cell's shape (ProtoNets train with more ways than they test).
    assert (cfg.eval.ways or cfg.episode.ways) == int(m["ways"])
    if m["shots"] is not None:
        assert cfg.episode.shots == int(m["shots"])
    else:  # Santoro et al.'s sequences: 10 instances per class, 20x20 images
        assert cfg.algo.name in ("mann", "lstm_baseline") and cfg.episode.shots + cfg.episode.queries == 10
        assert cfg.dataset.image_size == 20 and cfg.algo.memory == (cfg.algo.name == "mann")
    assert cfg.paper.source, "each preset names its source"
    if "eval_inner_steps" in cfg.algo:  # the ledger checks a run's test steps against the preset's own value
        assert load_presets()[preset].test_steps == cfg.algo.eval_inner_steps
    if cfg.algo.name in ("maml", "fomaml"):
        assert cfg.algo.first_order == (cfg.algo.name == "fomaml")
        assert cfg.trainer.iterations == 60000 and cfg.eval.episodes == 600
        if cfg.dataset.name == "omniglot":
            assert cfg.dataset.split == "finn"
            # Appendix A.1: 5-way "evaluated using 3 gradient steps", 20-way "trained and evaluated with 5"
            assert cfg.algo.eval_inner_steps == (3 if cfg.episode.ways == 5 else 5)
            assert (cfg.algo.inner_steps, cfg.algo.inner_lr, cfg.trainer.meta_batch_size) == (
                (1, 0.4, 32) if cfg.episode.ways == 5 else (5, 0.1, 16)
            )
        else:
            assert (cfg.algo.inner_steps, cfg.algo.inner_lr, cfg.episode.queries) == (5, 0.01, 15)
            assert cfg.algo.eval_inner_steps == 10  # "evaluated using 10 gradient steps at test time"
            assert cfg.backbone.name == "conv4_pool" and cfg.backbone.hidden == 32
    if cfg.algo.name == "meta_sgd":  # Li et al.: one step in training and at test, step sizes from U[0.005, 0.1]
        assert (cfg.algo.inner_steps, cfg.algo.eval_inner_steps, cfg.algo.first_order) == (1, 1, False)
        assert (cfg.algo.init_lr_min, cfg.algo.init_lr_max) == (0.005, 0.1)
        assert cfg.trainer.iterations == 60000 and cfg.eval.episodes == 600
        maml = compose_cfg("train", [f"experiment={preset.replace('meta_sgd', 'maml')}"])
        for key in ("episode", "trainer", "eval", "dataset", "backbone"):  # the rest as MAML's preset of the cell
            assert cfg[key] == maml[key], key
    if cfg.algo.name == "anil":  # MAML's preset of the cell with the inner loop on the head alone
        maml = compose_cfg("train", [f"experiment={preset.replace('anil', 'maml')}"])
        for key in ("episode", "trainer", "eval", "dataset", "backbone"):
            assert cfg[key] == maml[key], key
        inner = ("inner_steps", "inner_lr", "eval_inner_steps", "first_order")
        assert [cfg.algo[k] for k in inner] == [maml.algo[k] for k in inner]
    if cfg.algo.name == "maml_pp":  # HowToTrainYourMAMLPytorch's omniglot_maml++ configs
        assert (cfg.algo.inner_steps, cfg.algo.inner_lr, cfg.algo.msl_epochs, cfg.algo.epoch_iterations) == (
            5,
            0.1,
            10,
            500,
        )
        assert cfg.algo.learn_inner_lrs and cfg.algo.per_step_bn and not cfg.algo.first_order
        assert cfg.algo.first_order_epochs == 0 and cfg.episode.queries == 1 and cfg.trainer.meta_batch_size == 8
        assert (cfg.trainer.iterations, cfg.trainer.meta_lr, cfg.trainer.val_every) == (50000, 0.001, 500)
        assert (cfg.schedule.name, cfg.schedule.eta_min) == ("cosine", 1e-5) and cfg.eval.episodes == 600
        assert cfg.backbone.max_pool and cfg.backbone.leaky_slope == 0.01 and cfg.backbone.hidden == 64
        assert cfg.eval.ensemble == 5  # the logits of the 5 best validation checkpoints
    if cfg.dataset.name == "omniglot" and cfg.algo.name in ("matching", "matching_fce"):
        assert cfg.dataset.split == "vinyals"
    if cfg.dataset.name == "omniglot" and cfg.algo.name == "protonet":  # Snell et al.: trained on 1200 characters
        assert cfg.dataset.split == "vinyals_trainval" and cfg.eval.weights == "last" and cfg.backbone.running_stats


@pytest.mark.parametrize("preset", group_choices("experiment"))
def test_a_plain_run_of_every_preset_records_the_settings_its_file_sets(compose_cfg, preset):
    """RESULTS.md reads a run's recorded settings (results.json's config) against the values its preset file sets:
    a plain run of the preset must be its cell. The record holds no paths."""
    overrides = [f"experiment={preset}", "data_root=/nowhere/data", "cache_dir=/nowhere/cache"]
    cfg = compose_cfg("train", overrides)
    if "root" in cfg.dataset:  # a path typed as it is, not built from data_root
        cfg = compose_cfg("train", overrides + ["dataset.root=/nowhere/typed"])
    config = settings_record(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False))
    listed = load_presets()[preset]
    assert listed.settings and all(trained_with({"config": config}, listed, k) == v for k, v in listed.settings.items())
    assert "/nowhere" not in json.dumps(config) and "root" not in config["dataset"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_one_smoke_iteration(compose_cfg, tmp_path, preset):
    cfg = compose_cfg(
        "train",
        [
            f"experiment={preset}",
            "dataset=synthetic",
            "dataset.val_classes=20",
            "device=cpu",
            "trainer.iterations=1",
            "trainer.meta_batch_size=2",
            "trainer.val_episodes=2",
            "eval.episodes=2",
            "eval.meta_batch_size=2",
            "backbone.hidden=8",  # width is not part of the episode protocol
        ],
    )
    results = train_run(cfg, tmp_path)
    ways, shots, queries = engine.episode_shape(cfg, "test")
    assert (results["ways"], results["shots"], results["queries"]) == (ways, shots, queries)  # the test cell
    assert results["train_episode"]["ways"] == cfg.episode.ways
    assert results["test"]["episodes"] == 2 and 0 <= results["test"]["acc_mean"] <= 1
    assert (tmp_path / "results.json").is_file()


def test_reproduce_tables_name_existing_presets():
    module = load_script("reproduce")
    missing = {p for presets in module.TABLES.values() for p in presets} - set(PRESETS)
    assert not missing, f"scripts/reproduce.py names presets that do not exist: {sorted(missing)}"
