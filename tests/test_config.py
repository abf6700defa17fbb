"""Every config group file composes and instantiates; typos fail at compose time."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import REPO, group_choices
from fewshot.engine import _plain


def test_groups_present():
    for group in ("algo", "backbone", "dataset", "device", "trainer", "experiment", "hydra"):
        assert (REPO / "conf" / group).is_dir(), group
    assert {"auto", "cpu", "cuda"} <= set(group_choices("device"))
    assert {"default", "smoke"} <= set(group_choices("trainer"))


def test_contract_keys(compose_cfg):
    cfg = compose_cfg("train")
    for key in (
        "episode.ways",
        "episode.shots",
        "episode.queries",
        "trainer.meta_batch_size",
        "trainer.iterations",
        "eval.episodes",
        "seed",
        "data_root",
    ):
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None, key
    assert cfg.algo.name == "maml" and cfg.dataset.name == "omniglot" and cfg.device.name == "auto"


def test_data_root_from_env(compose_cfg, monkeypatch):
    monkeypatch.setenv("FEWSHOT_DATA_ROOT", "/somewhere/data")
    cfg = compose_cfg("train")
    assert cfg.data_root == "/somewhere/data" and cfg.dataset.root == "/somewhere/data/omniglot"
    monkeypatch.delenv("FEWSHOT_DATA_ROOT")
    assert compose_cfg("train").data_root == "./data"


@pytest.mark.parametrize("algo", group_choices("algo"))
def test_every_algo_instantiates(compose_cfg, algo):
    cfg = compose_cfg("train", [f"algo={algo}", "dataset=synthetic"])
    backbone = functools.partial(instantiate(_plain(cfg.backbone), _convert_="all"), in_channels=1, image_size=28)
    module = instantiate(_plain(cfg.algo), _convert_="all", backbone=backbone, ways=cfg.episode.ways)
    assert sum(p.numel() for p in module.parameters()) > 0
    assert cfg.algo.name == algo


@pytest.mark.parametrize("backbone", group_choices("backbone"))
def test_every_backbone_instantiates(compose_cfg, backbone):
    cfg = compose_cfg("train", [f"backbone={backbone}"])
    # Koch et al.'s siamese tower needs the paper's 105x105 drawings (valid 10x10, 7x7 and 4x4 convolutions).
    size = 105 if cfg.backbone.name == "koch" else 84 if cfg.backbone.get("max_pool") else 28
    net = instantiate(_plain(cfg.backbone), _convert_="all")(in_channels=3, image_size=size, out_features=5)
    assert net(__import__("torch").zeros(2, 3, size, size)).shape == (2, 5)


@pytest.mark.parametrize("dataset", group_choices("dataset"))
def test_every_dataset_composes(compose_cfg, dataset):
    cfg = compose_cfg("train", [f"dataset={dataset}"])
    assert dataset.startswith(cfg.dataset.name)  # omniglot_vinyals is omniglot with another split
    assert cfg.dataset._target_.startswith("fewshot.data.")


def test_synthetic_instantiates(compose_cfg):
    cfg = compose_cfg("train", ["dataset=synthetic"])
    data = instantiate(_plain(cfg.dataset), _convert_="all")
    assert {s: data.split(s).num_classes for s in ("train", "val", "test")} == {"train": 64, "val": 16, "test": 20}


@pytest.mark.parametrize(
    "overrides, meta_batch, meta_lr",
    [
        (["experiment=maml_omniglot_5w1s"], 32, 0.001),
        (["experiment=reptile_omniglot_5w1s"], 5, 1.0),  # the preset's meta-batch and meta step are kept
        (["experiment=maml_pp_omniglot_5w1s"], 8, 0.001),  # its own validation settings give way too
        ([], 8, 0.001),
    ],
)
def test_smoke_shortens_a_preset_too(compose_cfg, overrides, meta_batch, meta_lr):
    # trainer=smoke's budget comes after the experiment in the defaults list (conf/budget/smoke.yaml): a preset's
    # own 60,000 iterations must not silently outlast it; a command-line setting still beats both.
    cfg = compose_cfg("train", [*overrides, "trainer=smoke"])
    t = cfg.trainer
    budget = (t.iterations, t.val_every, t.val_episodes, t.checkpoint_every, t.log_every, cfg.eval.episodes)
    assert budget == (40, 20, 40, 20, 5, 100)
    assert (t.meta_batch_size, t.meta_lr) == (meta_batch, meta_lr)
    assert compose_cfg("train", [*overrides, "trainer=smoke", "trainer.iterations=7"]).trainer.iterations == 7
    assert compose_cfg("train", overrides).trainer.iterations != 40


@pytest.mark.parametrize("group", ["device", "trainer"])
def test_every_simple_group_composes(compose_cfg, group):
    for choice in group_choices(group):
        cfg = compose_cfg("train", [f"{group}={choice}"])
        assert cfg[group] is not None


@pytest.mark.parametrize(
    "override",
    [
        "trainer.iteratons=5",
        "episode.way=3",
        "algo.inner_lrr=0.1",
        "dataset.splt=finn",
        "backbone.hiden=3",
        "seed=abc",
        "episode.ways=five",
    ],
)
def test_typos_fail_at_compose_time(compose_cfg, override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", [override])


def test_unknown_choice_lists_choices(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="protonet"):
        compose_cfg("train", ["algo=nope"])


def test_eval_config_composes(compose_cfg):
    cfg = compose_cfg("eval", ["checkpoint=x.pt", "eval.episodes=10", "seed=3"])
    assert cfg.checkpoint == "x.pt" and cfg.eval.episodes == 10 and cfg.seed == 3


def test_hydra_run_dirs_under_outputs(compose_cfg):
    cfg = compose_cfg("train", ["dataset=synthetic"], return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/") and cfg.hydra.sweep.dir.startswith("outputs/")


def test_train_finds_configs_from_any_folder(tmp_path):
    """The console script composes its packaged config tree from an unrelated working folder."""
    exe = Path(sys.executable).with_name("fewshot-train")
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(exe), "dataset=synthetic", "device=cpu", "dry_run=true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "maml_synthetic_5w1s" in proc.stdout
    assert (tmp_path / "outputs" / "maml_synthetic_5w1s").is_dir()
