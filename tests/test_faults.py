"""Faults found on purpose (bad inputs, odd signals, silent corruption): each answered by one clear line or a
refusal instead of a wrong result or a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from fewshot import engine
from fewshot.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fewshot.engine import builder
from fewshot.eval import run as eval_run
from fewshot.table import TableError, aggregate, collect
from fewshot.train import run as train_run
from test_engine import TINY
from test_robustness import BIN, error_line, run_cli

SMOKE = [
    "dataset=synthetic",
    "device=cpu",
    "backbone.hidden=8",
    "trainer.meta_batch_size=2",
    "trainer.val_episodes=4",
    "eval.episodes=4",
    "episode.queries=2",
    "trainer.val_every=2",
    "trainer.checkpoint_every=2",
]


# ---- seeds ----------------------------------------------------------------------------------------


def test_seeds_that_would_repeat_smaller_ones_are_refused(compose_cfg, tmp_path):
    engine.check_seed(engine.MAX_SEED)
    for seed in (2**40, 2**62, -1, engine.MAX_SEED + 1):
        with pytest.raises(engine.ConfigError, match=rf"seed={seed}: seeds are integers from 0 to"):
            train_run(compose_cfg("train", TINY + [f"seed={seed}"]), tmp_path / str(seed))
    # the streams of every accepted seed are distinct 32-bit values
    assert len({(s * 1000 + k) % 2**32 for s in (0, 1, engine.MAX_SEED) for k in range(3)}) == 9


def test_seed_too_large_is_one_line_on_the_command_line(tmp_path):
    proc = run_cli(tmp_path, "fewshot-train", *SMOKE, "trainer.iterations=2", f"seed={2**62}")
    assert proc.returncode == 2 and error_line(proc).startswith(f"fewshot-train: error: seed={2**62}: seeds are")


def _results(tmp_path: Path, seed: int, acc: float, command: str, config: Optional[dict] = None) -> None:
    folder = tmp_path / f"s{seed}_{abs(hash(command)) % 1000}"
    folder.mkdir()
    (folder / "results.json").write_text(
        json.dumps(
            {
                **({} if config is None else {"config": config}),
                "name": "protonet_omniglot_5w1s",
                "algo": "protonet",
                "dataset": "omniglot",
                "backbone": "conv4_pool",
                "ways": 5,
                "shots": 1,
                "queries": 15,
                "seed": seed,
                "iterations": 100,
                "command": command,
                "test": {"episodes": 100, "acc_mean": acc, "acc_ci95": 0.01},
            }
        )
    )


def test_table_refuses_to_pool_seeds_that_share_streams(tmp_path):
    _results(tmp_path, 0, 0.9, "fewshot-train experiment=protonet_omniglot_5w1s seed=0")
    _results(tmp_path, 2**40, 0.9, f"fewshot-train experiment=protonet_omniglot_5w1s seed={2**40}")
    with pytest.raises(TableError, match=r"seeds 0 and 1099511627776 draw the same random streams"):
        aggregate(collect([tmp_path]))


def test_table_refuses_to_pool_runs_that_differ_beyond_the_seed(tmp_path):
    _results(tmp_path, 0, 0.9, "fewshot-train experiment=protonet_omniglot_5w1s seed=0 device=cuda")
    _results(tmp_path, 1, 0.8, "fewshot-train experiment=protonet_omniglot_5w1s seed=1 trainer.meta_lr=0.01")
    with pytest.raises(TableError, match=r"settings differ beyond the seed .*trainer.meta_lr=0.01"):
        aggregate(collect([tmp_path]))
    # the seed, the device and paths are no difference
    ok = tmp_path / "ok"
    ok.mkdir()
    _results(ok, 0, 0.9, "fewshot-train experiment=protonet_omniglot_5w1s seed=0 device=cuda")
    _results(ok, 1, 0.8, "fewshot-train experiment=protonet_omniglot_5w1s seed=1 device=cpu data_root=/x")
    (row,) = aggregate(collect([ok]))
    assert row.seeds == (0, 1)


def test_table_pools_by_the_recorded_settings_where_every_run_has_them(tmp_path):
    """results.json's config is what a run trained with: a restated value (trainer.meta_lr=0.001 where that is the
    preset's) pools, and a changed one with the same command does not; the seed, the device, what names code or a
    source (_target_, a URL) never count, and a key only some runs record (a setting added later) is left out."""
    command = "fewshot-train experiment=protonet_omniglot_5w1s seed={}"

    def config(seed: int, lr: float, **more) -> dict:
        code = {"_target_": f"fewshot.v{seed}.load", "base_url": f"https://v{seed}", "download": seed == 0}
        return {"seed": seed, "device": {"name": f"cuda:{seed}"}, "trainer": {"meta_lr": lr, **more}, "dataset": code}

    same = tmp_path / "same"
    same.mkdir()
    _results(same, 0, 0.9, command.format(0), config(0, 0.001))
    _results(same, 1, 0.8, command.format(1) + " trainer.meta_lr=1e-3", config(1, 0.001, val_every=500))
    (row,) = aggregate(collect([same]))
    assert row.seeds == (0, 1)
    changed = tmp_path / "changed"
    changed.mkdir()
    _results(changed, 0, 0.9, command.format(0), config(0, 0.001))
    _results(changed, 1, 0.8, command.format(1), config(1, 0.0001))
    with pytest.raises(TableError, match=r"settings differ beyond the seed \(trainer.meta_lr: 0.001 vs 0.0001\)"):
        aggregate(collect([changed]))
    # a group override is no key a config holds: compared by command; 10 and 10.0 are one value
    group = tmp_path / "group"
    group.mkdir()
    _results(group, 0, 0.9, command.format(0), config(0, 10))
    _results(group, 1, 0.8, command.format(1) + " trainer=smoke", config(1, 10.0))
    with pytest.raises(TableError, match=r"\[\] vs \[trainer=smoke\]"):
        aggregate(collect([group]))
    # a run from before config: the commands decide, and a warning says what they cannot show
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _results(mixed, 0, 0.9, command.format(0), config(0, 0.001))
    _results(mixed, 1, 0.8, command.format(1))
    warnings: list[str] = []
    (row,) = aggregate(collect([mixed]), warn=warnings.append)
    assert row.seeds == (0, 1) and len(warnings) == 1 and "1 of 2 runs record no settings" in warnings[0]


# ---- numbers that would be wrong without a word -------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_grad_clip_must_be_a_positive_norm(compose_cfg, tmp_path, value):
    with pytest.raises(engine.ConfigError, match=rf"trainer.grad_clip={value}(\.0)?: must be a positive gradient norm"):
        train_run(compose_cfg("train", TINY + [f"trainer.grad_clip={value}"]), tmp_path)


@pytest.mark.parametrize("change", ["eval.ways=2", "eval.queries=1", "trainer.val_episodes=12"])
def test_resume_refuses_other_validation_tasks(compose_cfg, tmp_path, change):
    common = TINY + ["algo=protonet"]  # a metric method: it may validate with other ways than it trains with
    train_run(compose_cfg("train", common + ["trainer.iterations=3"]), tmp_path)
    with pytest.raises(CheckpointError, match=rf"other settings \({change.split('=')[0]}"):
        train_run(compose_cfg("train", common + [change]), tmp_path)


def _forget(path: Path, *keys: str) -> None:
    """Rewrite a checkpoint as an older fewshot (or torch) wrote it: without the settings `keys` added since."""
    state = load_checkpoint(path)
    for key in keys:
        group, name = key.split(".")
        del state["config"][group][name]
    save_checkpoint(path, state)


def test_resume_after_an_upgrade_added_settings(compose_cfg, tmp_path):
    # An old checkpoint lacks what fewshot added later (backbone.leaky_slope, eval.ensemble) and what a newer
    # torch's Adam takes (decoupled_weight_decay): absent, they meant their defaults, so the run resumes.
    train_run(compose_cfg("train", TINY + ["trainer.iterations=3"]), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    _forget(last, "backbone.leaky_slope", "eval.ensemble", "optim.decoupled_weight_decay")
    assert train_run(compose_cfg("train", TINY + ["trainer.iterations=5"]), tmp_path)["iterations"] == 5
    # A setting the run asks for away from its default was not what the old checkpoint meant: refused.
    _forget(last, "backbone.leaky_slope")
    with pytest.raises(CheckpointError, match=r"other settings \(backbone.leaky_slope: 0.0 -> 0.01\)"):
        train_run(compose_cfg("train", TINY + ["trainer.iterations=6", "backbone.leaky_slope=0.01"]), tmp_path)


def test_resume_refuses_to_stretch_a_schedule(compose_cfg, tmp_path):
    # cosine's T_max is trainer.iterations: training longer would change the steps already taken
    train_run(compose_cfg("train", TINY + ["schedule=cosine", "trainer.iterations=3"]), tmp_path)
    with pytest.raises(CheckpointError, match=r"schedule spans its 3 iterations \(schedule.T_max: 3 -> 5\)"):
        train_run(compose_cfg("train", TINY + ["schedule=cosine", "trainer.iterations=5"]), tmp_path)


def test_resume_may_change_test_only_settings(compose_cfg, tmp_path):
    train_run(compose_cfg("train", TINY + ["trainer.iterations=3"]), tmp_path)
    results = train_run(compose_cfg("train", TINY + ["eval.episodes=12", "eval.meta_batch_size=3"]), tmp_path)
    assert results["test"]["episodes"] == 12


@pytest.mark.parametrize(
    "algo, lower",
    [  # the message names the step sizes the run has: the meta one, and the inner one where there is one
        ("maml", "trainer.meta_lr or algo.inner_lr"),
        ("meta_sgd", "trainer.meta_lr or algo.init_lr_max"),
        ("anil", "trainer.meta_lr or algo.inner_lr"),
        ("siamese", "trainer.meta_lr"),
    ],
)
def test_divergence_without_nan_stops_the_run(compose_cfg, tmp_path, algo, lower):
    cfg = compose_cfg("train", TINY + [f"algo={algo}", "trainer.meta_lr=1e9", "trainer.iterations=40"])
    with pytest.raises(engine.FewshotError, match=rf"the run diverged and stopped; .* Lower {lower}$"):
        train_run(cfg, tmp_path)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("graph_step", [False, True])
def test_divergence_mid_run_keeps_the_last_good_checkpoint(compose_cfg, tmp_path, monkeypatch, graph_step):
    # The meta step size jumps by 1e9 after iteration 3: the run has good checkpoints, then diverges.
    if graph_step:  # the CUDA graph step's code (divergence recorded on the device, read at checks), eagerly
        from fewshot.engine import loop
        from fewshot.engine.steps import GraphStep

        monkeypatch.setattr(loop, "make_step", lambda mode, device, *a, **k: GraphStep(*a, capture=False, **k))
    schedule = ["schedule=step", "schedule.step_size=3", "schedule.gamma=1e9", "trainer.checkpoint_every=1"]
    cfg = compose_cfg("train", TINY + ["algo=protonet", "trainer.iterations=40", *schedule])
    with pytest.raises(engine.FewshotError, match=r"at iteration (\d+): the run diverged") as err:
        train_run(cfg, tmp_path)
    bad = int(re.search(r"at iteration (\d+)", str(err.value)).group(1))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == bad - 1  # saved every iteration (checkpoint_every=1) up to the one before
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("key", ["eval.episodes", "trainer.val_episodes"])
def test_one_episode_has_no_interval(compose_cfg, tmp_path, key):
    with pytest.raises(engine.ConfigError, match=rf"{key}=1: at least 2 episodes, since a 95% interval"):
        train_run(compose_cfg("train", TINY + [f"{key}=1"]), tmp_path)


# ---- one line where a traceback was ---------------------------------------------------------------


def test_log_every_zero_is_one_line(compose_cfg, tmp_path):
    with pytest.raises(engine.ConfigError, match=r"trainer.log_every=0: must be a positive number"):
        train_run(compose_cfg("train", TINY + ["trainer.log_every=0"]), tmp_path)


def test_eval_unknown_split_and_incomplete_checkpoint(compose_cfg, tmp_path):
    train_run(compose_cfg("train", TINY + ["algo=protonet"]), tmp_path / "run")
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    with pytest.raises(engine.ConfigError, match=r"split='nope': choose one of train, val, test"):
        eval_run(compose_cfg("eval", [f"checkpoint={best}", "split=nope", "device=cpu"]), tmp_path / "e")
    state = load_checkpoint(best)
    del state["config_source"]
    state.pop("format")
    save_checkpoint(tmp_path / "cut.pt", state)
    with pytest.raises(CheckpointError, match=r"cut.pt is incomplete: it lacks config_source"):
        eval_run(compose_cfg("eval", [f"checkpoint={tmp_path / 'cut.pt'}", "device=cpu"]), tmp_path / "e2")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["dataset=sinusoid", "episode.ways=1", "algo=protonet"],
            "algo=protonet classifies, but dataset=sinusoid is a regression task",
        ),
        (["experiment=maml_sinusoid_k10", "algo.loss=cross_entropy"], "algo.loss=cross_entropy on dataset=sinusoid"),
        (["dataset=synthetic", "algo.loss=mse"], "algo.loss=mse on dataset=synthetic, a classification task"),
        (["dataset=synthetic", "backbone=mlp_sinusoid"], "backbone=mlp_sinusoid is the sinusoid regressor"),
    ],
)
def test_incompatible_combinations_are_refused_before_building(compose_cfg, tmp_path, overrides, message):
    with pytest.raises(engine.ConfigError, match=message):
        engine.build(compose_cfg("train", overrides + ["device=cpu"]))


def test_maml_graph_estimate_warns_before_a_run_outgrows_memory(compose_cfg, monkeypatch, capsys):
    cfg = compose_cfg("train", ["dataset=synthetic", "device=cpu", "algo.inner_steps=1000"])
    run = engine.build(cfg)
    need = run.algo.graph_bytes((1, 28, 28), 5, 75, 32, run.device)
    small = engine.build(compose_cfg("train", ["dataset=synthetic", "device=cpu"]))
    assert need > 50 * small.algo.graph_bytes((1, 28, 28), 5, 75, 32, run.device)  # grows with the inner steps
    assert need > 2**30  # the 1000-step graph is gigabytes (4.5 GB was measured for it)
    monkeypatch.setattr(builder, "available_memory", lambda device: 2**30)
    engine.warn_if_graph_too_big(run)
    err = capsys.readouterr().err
    assert "warning: maml's training graph needs about" in err and "algo.chunk_size" in err and "first_order" in err
    engine.warn_if_graph_too_big(small)
    assert capsys.readouterr().err == ""


def test_maml_pp_graph_estimate_counts_msl_and_names_the_meta_batch(compose_cfg, monkeypatch, capsys):
    base = ["dataset=synthetic", "device=cpu", "algo=maml_pp"]
    msl = engine.build(compose_cfg("train", base))
    final = engine.build(compose_cfg("train", base + ["algo.msl_epochs=0"]))
    first = engine.build(compose_cfg("train", base + ["algo.msl_epochs=0", "algo.first_order=true"]))
    args = ((1, 28, 28), 5, 75, 8, msl.device)
    assert msl.algo.graph_bytes(*args) > final.algo.graph_bytes(*args) > first.algo.graph_bytes(*args)
    monkeypatch.setattr(builder, "available_memory", lambda device: 1)
    engine.warn_if_graph_too_big(msl)
    err = capsys.readouterr().err
    assert "warning: maml_pp's training graph needs about" in err and "set trainer.meta_batch_size lower" in err


# ---- signals ----------------------------------------------------------------------------------------


def _popen(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "fewshot-train"), *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_during_the_test_says_what_happened_and_the_rerun_only_tests(tmp_path):
    # A long test phase (many episodes) on a short training: SIGTERM once best.pt is written and training ended.
    args = [*SMOKE, "trainer.iterations=2", "eval.episodes=200000", "eval.meta_batch_size=2", "hydra.run.dir=run"]
    proc = _popen(tmp_path, *args)
    _wait_for(tmp_path / "run" / "metrics.csv", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM during the test: training is complete" in err and "hydra.run.dir=" in err
    rerun = run_cli(tmp_path, "fewshot-train", *SMOKE, "trainer.iterations=2", "hydra.run.dir=run")
    assert rerun.returncode == 0, rerun.stderr
    assert "finished training at iteration 2; testing best.pt only" in rerun.stdout
    assert "resuming" not in rerun.stdout


def test_second_sigint_mid_iteration_stops_at_once_naming_the_last_checkpoint(compose_cfg, tmp_path, monkeypatch):
    # Both SIGINTs arrive inside iteration 5 (checkpoints at 3 and 6): the first is only recorded, the second
    # stops the run there, without writing iteration 5, and names iteration 3's checkpoint.
    from fewshot.engine import loop, steps

    class TwoSigints(steps.EagerStep):
        def __call__(self, it):
            if it == 5:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return super().__call__(it)

    monkeypatch.setattr(loop, "make_step", lambda mode, device, *a, **k: TwoSigints(*a, **k))
    last = tmp_path / "checkpoints" / "last.pt"
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own; conftest restores the worker's
    with pytest.raises(engine.Interrupted) as err:
        train_run(compose_cfg("train", TINY + ["algo=protonet"]), tmp_path)
    assert str(err.value) == (
        f"second SIGINT: stopped at once without a new checkpoint; the last checkpoint is {last} (iteration 3)"
    )
    assert err.value.exit_code == 128 + signal.SIGINT
    assert load_checkpoint(last)["iteration"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a Python caller gets its Ctrl-C back


@pytest.mark.parametrize("console", [False, True])
def test_handlers_after_an_interrupted_run(console, monkeypatch):
    # A Python caller (a notebook) must still be interruptible after a run it started was; fewshot-train's job,
    # whose process exits next, ignores further signals so that one more Ctrl-C on the way out is not a traceback.
    from fewshot.engine import signals

    monkeypatch.setattr(signals, "_ignore_after_interrupt", False)
    if console:
        signals.leave_signals_ignored_after_interrupt()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own; conftest restores the worker's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    python_defaults = (signal.default_int_handler, signal.SIG_DFL)
    with signals.stop_on_signals() as guard:  # uninterrupted: both handlers restored either way
        assert signal.getsignal(signal.SIGINT) == guard.handler
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == python_defaults
    with pytest.raises(engine.Interrupted), signals.stop_on_signals() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.received == [signal.SIGINT]
        raise engine.Interrupted("stopped", signal.SIGINT)
    after = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    assert after == ((signal.SIG_IGN, signal.SIG_IGN) if console else python_defaults)


def test_the_train_job_chooses_to_ignore_signals_after_an_interrupt(monkeypatch, tmp_path):
    # fewshot-train's Hydra job makes the choice, in whatever process runs it (the command's, a sweep worker's),
    # before its run starts; fewshot.train.run alone does not.
    from fewshot import train
    from fewshot.engine import signals

    class Hydra:
        @staticmethod
        def get():
            return type("Config", (), {"runtime": type("Runtime", (), {"output_dir": str(tmp_path)})})

    monkeypatch.setattr(signals, "_ignore_after_interrupt", False)
    monkeypatch.setattr(train, "HydraConfig", Hydra)
    seen = []
    monkeypatch.setattr(train, "run", lambda cfg, run_dir: seen.append(signals._ignore_after_interrupt))
    train._job.__wrapped__(None)
    assert seen == [True]


def test_second_sigint_is_one_line_on_the_command_line(tmp_path):
    # The command line's side of a second SIGINT: one line, no traceback, exit 130, a checkpoint named (the
    # first SIGINT may already have ended the run by the time the second comes: either line is the CLI's).
    args = [*SMOKE, "trainer.iterations=100000", "trainer.val_every=100000", "hydra.run.dir=run"]
    proc = _popen(tmp_path, *args)
    _wait_for(tmp_path / "run" / "checkpoints" / "last.pt", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("fewshot-train: error:")]
    assert len(line) == 1 and ("second SIGINT: stopped at once" in line[0] or "SIGINT at iteration" in line[0])
    assert "last.pt" in line[0]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] >= 2


def test_sigterm_while_preparing_data_says_nothing_was_trained(tmp_path):
    # Building the run (Omniglot's decoding, here a slowed dataset constructor) is interruptible at once.
    (tmp_path / "slow.py").write_text(
        "import time\nfrom fewshot.data.synthetic import load_synthetic\n"
        "def load(**kw):\n    time.sleep(60)\n    return load_synthetic(**kw)\n"
    )
    proc = subprocess.Popen(
        [str(BIN / "fewshot-train"), *SMOKE, "trainer.iterations=2", "hydra.run.dir=run", "dataset._target_=slow.load"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    _wait_for(tmp_path / "run" / ".hydra" / "config.yaml", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM while preparing the run: nothing was trained yet" in err
