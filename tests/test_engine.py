"""The train/eval story end to end on CPU: files written, checkpoints self-describing, eval reproduces."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import assert_learns, cuda_generator_state, straight_and_resumed
from fewshot import engine
from fewshot.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fewshot.eval import run as eval_run
from fewshot.train import run as train_run

TINY = [
    "dataset=synthetic",
    "device=cpu",
    "backbone.hidden=16",
    "trainer.meta_batch_size=4",
    "trainer.iterations=6",
    "trainer.val_every=3",
    "trainer.val_episodes=10",
    "trainer.checkpoint_every=3",
    "eval.episodes=20",
    "eval.meta_batch_size=8",
    "episode.queries=3",
]


@pytest.fixture
def tiny_run(compose_cfg, tmp_path):
    def _run(*overrides: str):
        cfg = compose_cfg("train", TINY + list(overrides))
        run_dir = tmp_path / cfg.name
        return cfg, run_dir, train_run(cfg, run_dir)

    return _run


@pytest.mark.parametrize("algo", ["maml", "protonet", "matching"])
def test_run_folder_contents(tiny_run, algo):
    cfg, run_dir, results = tiny_run(f"algo={algo}")
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [int(r["iteration"]) for r in rows] == [3, 6]
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in ("algo", "dataset", "backbone", "ways", "shots", "queries", "seed", "iterations", "train_seconds"):
        assert key in on_disk, key
    assert on_disk["val_seconds"] > 0 and on_disk["test_seconds"] > 0  # kept apart from train_seconds
    test = on_disk["test"]
    assert test["episodes"] == 20 and 0.0 <= test["acc_mean"] <= 1.0 and test["acc_ci95"] >= 0.0
    assert on_disk["algo"] == algo and on_disk["ways"] == 5 and on_disk["queries"] == 3
    # the resolved settings, which RESULTS.md checks the run against its preset by; no paths, no paper numbers
    config = on_disk["config"]
    assert config["trainer"]["meta_lr"] == cfg.trainer.meta_lr and config["algo"]["name"] == algo
    assert config["trainer"]["iterations"] == 6 and config["name"] == cfg.name
    assert not {"data_root", "cache_dir", "paper", "revisions"} & set(config)
    assert ("step_acc" in test) == (algo == "maml")
    if algo == "maml":
        assert len(test["step_acc"]) == cfg.algo.eval_inner_steps + 1
    assert "accuracy (%)" in (run_dir / "results.md").read_text()


def test_checkpoint_is_self_describing(tiny_run):
    cfg, run_dir, _ = tiny_run("algo=protonet")
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["iteration"] == 6 and state["algo"] == "protonet" and state["backbone"] == "conv4"
    for key in ("model", "optimizer", "best", "rng", "sampler", "config", "config_source"):
        assert key in state, key
    assert state["config"]["episode"]["ways"] == 5 and state["config"]["trainer"]["iterations"] == 6
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"])


# reptile: its test draws inner mini-batches of 5 at random, out of 10 support images with 2 shots
@pytest.mark.parametrize("algo, shots", [("maml", 1), ("reptile", 2)])
def test_eval_reproduces_training_test_number(tiny_run, compose_cfg, tmp_path, algo, shots):
    cfg, run_dir, results = tiny_run(f"algo={algo}", f"episode.shots={shots}")
    ecfg = compose_cfg("eval", [f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "device=cpu"])
    again = eval_run(ecfg, tmp_path / "eval")
    assert again["test"] == results["test"]
    assert again["config"]["trainer"] == results["config"]["trainer"]  # the training run's settings, re-tested
    other = eval_run(
        compose_cfg(
            "eval", [f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "device=cpu", "seed=5", "eval.episodes=10"]
        ),
        tmp_path / "eval2",
    )
    assert other["test"]["episodes"] == 10 and other["seed"] == 5
    assert other["test_seconds"] > 0 and other["train_seconds"] is None and other["val_seconds"] is None
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["test"] == results["test"]


def test_the_test_reads_the_weights_asked_for(tiny_run, compose_cfg, tmp_path):
    # eval.weights=last: the final weights, as Reptile's reference tests; best: validation's pick (the default)
    _, run_dir, _ = tiny_run("algo=protonet")
    best = run_dir / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    state["model"] = {k: v.zero_() if v.is_floating_point() else v for k, v in state["model"].items()}
    state["iteration"] = 3
    save_checkpoint(best, state)  # a best.pt unlike the final weights
    tests = []
    for weights, iteration in (("last", 6), ("best", 3)):
        results = tiny_run("algo=protonet", f"eval.weights={weights}")[2]  # trained already: tests only
        assert results["tested"] == {"checkpoint": f"{weights}.pt", "iteration": iteration}
        ecfg = compose_cfg("eval", [f"checkpoint={run_dir / 'checkpoints' / f'{weights}.pt'}", "device=cpu"])
        assert eval_run(ecfg, tmp_path / f"eval_{weights}")["test"] == results["test"]
        tests.append(results["test"]["acc_mean"])
    assert tests[0] != tests[1]


def test_a_finished_run_is_retested_with_other_test_steps(tiny_run):
    # algo.eval_inner_steps only adapts at validation and test, so a finished run may be re-tested with the
    # paper's steps; its weights are the same, and step_acc's first steps equal the longer test's
    _, run_dir, four = tiny_run("algo=maml", "algo.eval_inner_steps=4")
    trained = (run_dir / "metrics.csv").read_text(), (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    _, _, two = tiny_run("algo=maml", "algo.eval_inner_steps=2")  # trained already: tests only
    assert ((run_dir / "metrics.csv").read_text(), (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns) == trained
    assert four["tested"]["inner_steps"] == 4 and two["tested"]["inner_steps"] == 2
    assert len(four["test"]["step_acc"]) == 5 and len(two["test"]["step_acc"]) == 3
    assert two["test"]["step_acc"] == four["test"]["step_acc"][:3]
    assert two["test"]["acc_mean"] == two["test"]["step_acc"][2]


def test_eval_retests_a_checkpoint_with_other_inner_steps(tiny_run, compose_cfg, tmp_path):
    # fewshot-eval's eval.inner_steps: the same weights and tasks, adapted for fewer or more steps than the run's test
    _, run_dir, four = tiny_run("algo=maml", "algo.eval_inner_steps=4")
    ckpt = f"checkpoint={run_dir / 'checkpoints' / four['tested']['checkpoint']}"
    same = eval_run(compose_cfg("eval", [ckpt, "device=cpu"]), tmp_path / "same")
    two = eval_run(compose_cfg("eval", [ckpt, "device=cpu", "eval.inner_steps=2"]), tmp_path / "two")
    assert same["test"] == four["test"] and same["tested"] == four["tested"]
    assert two["tested"] == {**four["tested"], "inner_steps": 2} and two["config"]["algo"]["eval_inner_steps"] == 2
    assert (
        two["test"]["step_acc"] == four["test"]["step_acc"][:3]
        and two["test"]["acc_mean"] == four["test"]["step_acc"][2]
    )
    with pytest.raises(engine.ConfigError, match=r"^eval.inner_steps=0: must be >= 1, as algo.eval_inner_steps"):
        eval_run(compose_cfg("eval", [ckpt, "device=cpu", "eval.inner_steps=0"]), tmp_path / "zero")
    # the Meta-LSTM's test steps are its eval_updates
    _, lstm_dir, lstm = tiny_run("algo=meta_lstm", "algo.updates=3")
    assert lstm["tested"]["inner_steps"] == 3 and len(lstm["test"]["step_acc"]) == 4
    lstm_ckpt = f"checkpoint={lstm_dir / 'checkpoints' / lstm['tested']['checkpoint']}"
    one = eval_run(compose_cfg("eval", [lstm_ckpt, "device=cpu", "eval.inner_steps=1"]), tmp_path / "lstm")
    assert one["tested"]["inner_steps"] == 1 and one["config"]["algo"]["eval_updates"] == 1
    assert one["test"]["step_acc"] == lstm["test"]["step_acc"][:2]
    for algo, why in (("protonet", "own to set; drop eval.inner_steps"), ("maml_pp", "adapts with its training steps")):
        _, other_dir, _ = tiny_run(f"algo={algo}", "algo.inner_steps=2" if algo == "maml_pp" else "seed=0")
        other = f"checkpoint={other_dir / 'checkpoints' / 'best.pt'}"
        with pytest.raises(engine.ConfigError, match=rf"algo={algo} model, whose test has no inner steps.*{why}"):
            eval_run(compose_cfg("eval", [other, "device=cpu", "eval.inner_steps=3"]), tmp_path / algo)


def test_a_finished_run_copied_is_tested_as_its_twin_cell(compose_cfg, tmp_path):
    # Validation never touches training (fixed_rng), so runs that differ only in their test tasks' shape train the
    # same weights: a finished run's copy, run again as the other cell, gives that cell's number exactly.
    common = TINY + ["algo=protonet", "backbone.running_stats=true", "eval.weights=last"]
    twin = ["eval.ways=3", "name=twin"]
    five = train_run(compose_cfg("train", common), tmp_path / "five")
    alone = train_run(compose_cfg("train", common + twin), tmp_path / "alone")
    shutil.copytree(tmp_path / "five", tmp_path / "copy")
    copied = train_run(compose_cfg("train", common + twin), tmp_path / "copy")  # trained already: tests only
    weights = [load_checkpoint(tmp_path / d / "checkpoints" / "last.pt")["model"] for d in ("five", "alone")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert copied["test"] == alone["test"] != five["test"] and copied["ways"] == 3 and copied["name"] == "twin"
    assert copied["tested"]["changed_since_training"] == [
        "eval.ways: None -> 3",
        "name: protonet_synthetic_5w1s -> twin",
    ]
    assert "changed_since_training" not in alone["tested"]


def test_a_run_tested_on_best_pt_is_not_copied_into_another_cell(compose_cfg, tmp_path):
    # best.pt was picked by the validation the run trained with: another cell's own run would pick another
    common = TINY + ["algo=protonet"]
    train_run(compose_cfg("train", common), tmp_path)
    with pytest.raises(CheckpointError, match=r"as another cell \(eval.ways, name\) needs eval.weights=last"):
        train_run(compose_cfg("train", common + ["eval.ways=3", "name=twin"]), tmp_path)
    assert "changed_since_training" not in train_run(compose_cfg("train", common), tmp_path)["tested"]


def test_a_run_in_progress_keeps_its_test_steps(tiny_run):
    # Mid-run, algo.eval_inner_steps would give validation scores of two meanings in one metrics.csv column
    tiny_run("algo=maml", "algo.eval_inner_steps=4", "trainer.iterations=3")
    with pytest.raises(CheckpointError, match=r"algo.eval_inner_steps: 4 -> 2"):
        tiny_run("algo=maml", "algo.eval_inner_steps=2")
    assert tiny_run("algo=maml", "algo.eval_inner_steps=4")[2]["tested"]["inner_steps"] == 4  # its own: resumes


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.weights=final"], r"eval.weights=final: choose best \(best.pt\) or last"),
        (["algo=maml_pp", "eval.weights=last", "eval.ensemble=2"], r"eval.weights=last with eval.ensemble=2"),
    ],
)
def test_bad_test_weights_are_one_clear_error(compose_cfg, tmp_path, overrides, message):
    with pytest.raises(engine.ConfigError, match=message):
        train_run(compose_cfg("train", TINY + overrides), tmp_path)


# The sinusoid presets at TINY's budget (without its image dataset, backbone and episode).
TINY_SINUSOID = [o for o in TINY if not o.startswith(("dataset=", "backbone.", "episode."))]


# Every algorithm (conf/algo/), as any may test its final weights (eval.weights=last): there the validation settings
# only draw the learning curve, and the ledger leaves them out of what makes a run differ from its preset. The
# sinusoid baseline (pretrain) runs as its presets, below.
ALGOS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "algo").glob("*.yaml") if p.stem != "pretrain")


@pytest.mark.parametrize(
    "overrides",
    [
        *([*TINY, f"algo={a}"] for a in ALGOS),
        # and as their presets have them: ProtoNets' running statistics and step schedule, Reptile's SGD and linear one
        *([*TINY, f"experiment={p}_omniglot_5w1s"] for p in ("protonet", "reptile")),
        *([*TINY_SINUSOID, f"experiment={p}_sinusoid_k5"] for p in ("maml", "pretrain")),
    ],
    ids=lambda o: o[-1].split("=")[1],
)  # reptile draws at random while it validates
def test_validation_does_not_disturb_training(compose_cfg, tmp_path, overrides):
    # validating 10 tasks at 3 and 6, or 4 at 6 only: the same training, to the bit (two run folders)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    train_run(compose_cfg("train", [*overrides, "seed=3"]), a_dir)
    train_run(compose_cfg("train", [*overrides, "seed=3", "trainer.val_every=6", "trainer.val_episodes=4"]), b_dir)
    assert [len((d / "metrics.csv").read_text().splitlines()) for d in (a_dir, b_dir)] == [3, 2]  # header + rows
    wa, wb = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (a_dir, b_dir))
    assert wa.keys() == wb.keys() and all(torch.equal(v, wb[k]) for k, v in wa.items())


def test_cli_train_then_eval(tmp_path):
    """The console scripts, as a user runs them: train writes a run folder, eval reproduces its number."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(tmp_path / "cache")}
    train = subprocess.run(
        [str(bin_dir / "fewshot-train"), "algo=protonet", *TINY, "hydra.run.dir=run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    ev = subprocess.run(
        [str(bin_dir / "fewshot-eval"), "checkpoint=run/checkpoints/best.pt", "device=cpu", "hydra.run.dir=ev"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["test"] == results["test"]
    assert "accuracy (%)" in ev.stdout


# Real learning on Omniglot, 5-way 1-shot, on CPU. Measured on the 2-core dev machine (100 test tasks):
#   maml, 100 iterations: 68.6 ± 2.5%   protonet, 60: 71.7 ± 2.5%   matching, 60: 63.9 ± 2.6%   (chance: 20%)
#   meta_sgd, 100: 65.2 ± 2.6% (34.8 untrained, one step at its initial step sizes; maml's was 53.8 after 10 steps)
#   anil, 100: 61.9 ± 3.1% (36.1 untrained: 10 steps of the head alone on random conv features)
# The same test tasks scored by the untrained model give the baseline each run must clearly beat:
# random conv features alone already classify some Omniglot characters.
LEARNING = {"maml": 100, "meta_sgd": 100, "protonet": 60, "matching": 60, "anil": 100}


@pytest.mark.slow
@pytest.mark.omniglot
@pytest.mark.parametrize("algo", sorted(LEARNING))
def test_learns_omniglot_5way_1shot(compose_cfg, tmp_path, omniglot_root, omniglot_cache_dir, omniglot_28, algo):
    iters = LEARNING[algo]
    cfg = compose_cfg(
        "train",
        [
            f"algo={algo}",
            "device=cpu",
            f"data_root={omniglot_root.parent}",
            f"cache_dir={omniglot_cache_dir}",
            "trainer.meta_batch_size=8",
            f"trainer.iterations={iters}",
            f"trainer.val_every={iters}",
            "trainer.val_episodes=20",
            "eval.episodes=100",
            "episode.queries=5",
        ],
    )
    assert_learns(cfg, tmp_path, algo, floor=0.55, gain=0.10)


# Matching Networks at an equal short budget keep up with ProtoNets; the textbook cosine (a nearly flat softmax
# after the embedding's ReLU) does not. Measured on the 2-core dev machine, 200 iterations, 300 test tasks:
#   matching (support_cosine) 79.9%, protonet 80.9%, matching with similarity=cosine 68.4% (100 tasks).
@pytest.mark.slow
@pytest.mark.omniglot
def test_matching_keeps_up_with_protonet(compose_cfg, tmp_path, omniglot_root, omniglot_cache_dir, omniglot_28):
    def train(*overrides: str) -> float:
        cfg = compose_cfg(
            "train",
            [
                *overrides,
                "device=cpu",
                f"data_root={omniglot_root.parent}",
                f"cache_dir={omniglot_cache_dir}",
                "trainer.meta_batch_size=8",
                "trainer.iterations=200",
                "trainer.val_every=200",
                "trainer.val_episodes=20",
                "eval.episodes=300",
                "episode.queries=5",
            ],
        )
        return train_run(cfg, tmp_path / "_".join(overrides))["test"]["acc_mean"]

    protonet = train("algo=protonet")
    matching = train("algo=matching")
    flat = train("algo=matching", "algo.similarity=cosine")
    print(f"protonet {protonet:.3f}, matching {matching:.3f}, matching with the flat cosine softmax {flat:.3f}")
    assert matching > protonet - 0.05, (matching, protonet)
    assert flat < protonet - 0.05, "the flat-softmax control should fall behind; the test has lost its power"


@pytest.mark.omniglot
def test_eval_lake_runs_benchmark(compose_cfg, tmp_path, omniglot_root, omniglot_cache_dir, omniglot_28):
    """fewshot-eval benchmark=lake_runs scores a checkpoint on Lake's 20 original 20-way one-shot runs."""
    common = [
        f"data_root={omniglot_root.parent}",
        f"cache_dir={omniglot_cache_dir}",
        "device=cpu",
        "backbone.hidden=8",
        "trainer.iterations=2",
        "trainer.val_every=2",
        "trainer.val_episodes=4",
        "eval.episodes=4",
        "episode.queries=2",
        "trainer.meta_batch_size=2",
    ]
    train_run(compose_cfg("train", ["algo=protonet", *common]), tmp_path / "proto")
    ecfg = compose_cfg(
        "eval",
        [
            f"checkpoint={tmp_path / 'proto/checkpoints/best.pt'}",
            "benchmark=lake_runs",
            "device=cpu",
            f"data_root={omniglot_root.parent}",
            f"cache_dir={omniglot_cache_dir}",
        ],
    )
    results = eval_run(ecfg, tmp_path / "lake")
    lake = results["lake"]
    errors = list(lake["error_per_run"].values())
    assert len(errors) == 20
    assert all(e == pytest.approx(5 * round(e / 5)) and 0 <= e <= 100 for e in errors)  # 20 trials a run: 5% each
    assert results["eval_split"] == "lake_runs" and results["test"]["episodes"] == 20
    assert "run01" in (tmp_path / "lake" / "results.md").read_text()

    # A 5-way MAML head cannot answer a 20-way trial: refused with a clear message.
    train_run(compose_cfg("train", ["algo=maml", *common]), tmp_path / "maml")
    ecfg = compose_cfg(
        "eval",
        [
            f"checkpoint={tmp_path / 'maml/checkpoints/best.pt'}",
            "benchmark=lake_runs",
            "device=cpu",
            f"data_root={omniglot_root.parent}",
            f"cache_dir={omniglot_cache_dir}",
        ],
    )
    with pytest.raises(engine.ConfigError, match="5-way head"):
        eval_run(ecfg, tmp_path / "lake2")


@pytest.mark.parametrize("schedule, factor", [("step", 0.5**3), ("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)])
def test_learning_rate_schedules(tiny_run, schedule, factor):
    # TINY trains 6 iterations; step halves every 2 of them here, cosine and linear end at 0.
    extra = ["schedule.step_size=2"] if schedule == "step" else []
    cfg, run_dir, _ = tiny_run("algo=protonet", f"schedule={schedule}", *extra)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.trainer.meta_lr * factor, abs=1e-12)
    assert (state["scheduler"] is None) == (schedule == "constant")
    if state["scheduler"] is not None:  # cosine and linear both end at 0: the state names which one ran
        assert {"step": "step_size", "cosine": "T_max", "linear": "total_iters"}[schedule] in state["scheduler"]
    assert json.loads((run_dir / "results.json").read_text())["schedule"] == schedule


def test_resume_continues_the_schedule(compose_cfg, tmp_path):
    """Training 3 iterations, then resuming to 6, ends with the uninterrupted run's learning rate and weights."""
    common = TINY + ["algo=protonet", "schedule=step", "schedule.step_size=2"]
    _, _, a, b = straight_and_resumed(compose_cfg, tmp_path, common)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_a_run_resumed_on_another_machine_names_each_device(compose_cfg, tmp_path):
    """A cell finished over several GPU leases (scripts/gpu_cells.sh, RESUME=) trained on each machine it ran on, and
    train_seconds sums their times: results.json names them all (train_devices), where the test ran last (device)."""
    common = TINY + ["algo=protonet"]
    train_run(compose_cfg("train", [*common, "trainer.iterations=2"]), tmp_path / "run")
    first = train_run(compose_cfg("train", [*common, "trainer.iterations=3"]), tmp_path / "run")  # resumed on cpu
    assert first["train_devices"] == ["cpu"] and first["device"] == "cpu"
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert state["progress"]["devices"] == ["cpu"]
    # As if iterations 1-3 had run on a GPU: its device, and the CUDA generators' states (16 bytes: seed, offset),
    # which a CPU generator cannot take (the sampler reseeds from them).
    state["progress"]["devices"] = ["cuda (NVIDIA H100 80GB HBM3)"]
    cuda_state = cuda_generator_state(7, 64)
    state["sampler"] = {"generator": cuda_state, "device": "cuda"}
    state["rng"]["cuda"] = [cuda_state]
    save_checkpoint(last, state)
    results = train_run(compose_cfg("train", common), tmp_path / "run")
    assert results["train_devices"] == ["cuda (NVIDIA H100 80GB HBM3)", "cpu"] and results["device"] == "cpu"
    # A checkpoint from before devices were recorded says so; its sampler state did not name its device either.
    del state["progress"]["devices"], state["sampler"]["device"]
    save_checkpoint(last, state)
    again = train_run(compose_cfg("train", common), tmp_path / "run")
    assert again["train_devices"] == ["a device not recorded", "cpu"]


def test_a_checkpoint_saved_before_presets_listed_revisions_resumes(tiny_run):
    """A preset that gains a revision (RESULTS.md's record of a value it used to set) does not stop its runs in
    progress from resuming: the list is a label, not a setting; nor does a moved split folder."""
    cfg, run_dir, _ = tiny_run("algo=protonet")
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    del state["config"]["revisions"]
    config = OmegaConf.to_container(cfg, resolve=True)
    config["revisions"] = [{"key": "trainer.meta_lr", "was": 0.0001, "until": "2026-11-29T07:00:00Z"}]
    config["dataset"]["split_dir"] = "/moved/splits"  # paths may move between machines, as dataset.root
    assert engine.check_same_run(state, config, run_dir) == []
    config["trainer"]["meta_lr"] = 0.5  # a setting still refuses
    with pytest.raises(CheckpointError, match="trainer.meta_lr"):
        engine.check_same_run(state, config, run_dir)


def test_bad_schedule_setting_is_one_clear_error(compose_cfg, tmp_path):
    cfg = compose_cfg("train", TINY + ["schedule=step", "schedule.gamma=-0.5"])
    with pytest.raises(engine.ConfigError, match=r"schedule.gamma=-0.5"):
        train_run(cfg, tmp_path)


def test_old_matching_checkpoint_rebuilds_with_the_plain_cosine():
    old = {"algo": {"_target_": "fewshot.algorithms.matching.MatchingNetworks", "name": "matching", "fce": False}}
    new = engine.upgrade_config(old)
    assert new["algo"]["similarity"] == "cosine" and new["schedule"]["name"] == "constant"
    assert (
        engine.upgrade_config({"algo": {"name": "matching", "similarity": "support_cosine"}})["algo"]["similarity"]
        == "support_cosine"
    )


@pytest.mark.parametrize(
    "algo",
    # meta_sgd: its step sizes and their Adam state are meta-parameters beside the net's
    # maml_pp: its epoch counter (MSL's weights) is a buffer
    [["algo=siamese"], ["algo=mann", "algo.slots=16"], ["algo=lstm_baseline"], ["algo=meta_sgd"], ["algo=maml_pp"]],
    ids=lambda a: a[0],
)
def test_resume_is_bit_for_bit_for_every_family(compose_cfg, tmp_path, algo):
    """Training 3 iterations, then resuming to 6, ends with the uninterrupted run's weights and test score (the
    Meta-Learner LSTM's twin is test_meta_lstm.py::test_eval_reproduces_and_resume_is_bit_identical): the
    algorithms that draw their own randomness (siamese distortions, MANN's sequence order) draw it from the RNG
    states that checkpoints keep."""
    straight, resumed, _, _ = straight_and_resumed(compose_cfg, tmp_path, TINY + algo)
    assert straight["test"] == resumed["test"]


def test_evaluate_reports_the_mean_and_its_interval_by_hand():
    # 5 tasks in batches of 2, 2, 1 (a ragged last batch): scores 1, 0, 1, 1, 0 -> mean 0.6; the sample standard
    # deviation is sqrt(0.3), so the 95% interval is 1.96 * sqrt(0.3) / sqrt(5) = 0.48010
    from fewshot.algorithms.base import AlgoOutput, Algorithm
    from fewshot.engine.evaluation import evaluate

    scores = iter([[1.0, 0.0], [1.0, 1.0], [0.0]])

    class Fixed(Algorithm):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, episode, train=True):
            assert not train and episode == "tasks"
            return AlgoOutput(loss=self.w.sum(), score=torch.tensor(next(scores)))

    class Tasks:
        generator = torch.Generator()

        def sample(self, n):
            return "tasks"

    result = evaluate(Fixed(), Tasks(), episodes=5, batch=2, seed=0)
    assert result["episodes"] == 5 and result["acc_mean"] == pytest.approx(0.6)
    assert result["acc_ci95"] == pytest.approx(0.48010, abs=1e-5)


def test_running_statistics_run_and_are_refused_where_the_forward_is_functional(tiny_run, compose_cfg, tmp_path):
    # backbone.running_stats: a protonet run keeps the statistics in its checkpoints, and fewshot-eval repeats its test
    _, run_dir, results = tiny_run("algo=protonet", "backbone.running_stats=true")
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["model"]["net.features.1.running_mean"].abs().sum() > 0
    ecfg = compose_cfg("eval", [f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "device=cpu"])
    assert eval_run(ecfg, tmp_path / "eval")["test"] == results["test"]
    with pytest.raises(engine.ConfigError, match=r"backbone.running_stats=true: algo=maml normalises with each batch"):
        train_run(compose_cfg("train", TINY + ["algo=maml", "backbone.running_stats=true"]), tmp_path / "maml")


def test_metrics_csv_keeps_one_line_ending_across_a_resume(tmp_path):
    from fewshot.engine.checkpoints import truncate_metrics
    from fewshot.engine.results import append_csv

    path = tmp_path / "metrics.csv"
    for iteration in (500, 1000, 1500):
        append_csv(path, {"iteration": iteration, "val_acc": 0.5})
    truncate_metrics(path, 1000)  # a resume from the checkpoint at 1000
    append_csv(path, {"iteration": 1500, "val_acc": 0.6})
    data = path.read_bytes()
    assert b"\r" not in data
    assert data.decode().splitlines() == ["iteration,val_acc", "500,0.5", "1000,0.5", "1500,0.6"]
