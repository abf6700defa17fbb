"""eval.ensemble (MAML++'s test): the top-N validation checkpoints kept on disk, their logits averaged over the same
test tasks as the plain test, reproduced by fewshot-eval and across a resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import straight_and_resumed
from fewshot import engine
from fewshot.algorithms.base import accuracy
from fewshot.engine.ensemble import evaluate_ensemble, keep_top, top_file
from fewshot.engine.graphs import EvalGraphs
from fewshot.errors import ConfigError
from fewshot.eval import run as eval_run
from test_engine import TINY

ENSEMBLE = [*TINY, "algo=maml_pp", "algo.inner_steps=2", "trainer.val_every=1", "eval.ensemble=3"]


def test_keep_top_holds_the_best_n_on_disk(tmp_path):
    (tmp_path / "top_99.pt").write_bytes(b"left by a run killed before its last.pt")
    top: list[dict] = []
    for it, score in enumerate([0.5, 0.7, 0.6, 0.7, 0.9, 0.4], start=1):
        top = keep_top(top, score, it, 3, tmp_path, lambda it=it: {"w": torch.tensor(float(it))})
    assert [e["iteration"] for e in top] == [5, 2, 4]  # a tie keeps the earlier validation
    assert json.loads((tmp_path / "top.json").read_text()) == top
    assert sorted(p.name for p in tmp_path.glob("top_*.pt")) == ["top_2.pt", "top_4.pt", "top_5.pt"]
    assert torch.load(top_file(tmp_path, 4))["model"]["w"].item() == 4.0


def _run(compose_cfg, overrides):
    cfg = compose_cfg("train", overrides)
    engine.seed_everything(cfg.seed)
    return engine.build(cfg)


def test_one_member_is_the_plain_test_and_members_average_their_logits(compose_cfg):
    run = _run(compose_cfg, ENSEMBLE)
    t, algo = run.settings, run.algo
    sampler = engine.make_sampler(run, "test")
    seed = engine.episode_seed(t.seed, "test")
    first = {"model": {k: v.clone() for k, v in algo.state_dict().items()}, "iteration": 1}
    plain = engine.evaluate(algo, sampler, 20, 8, seed)
    alone = evaluate_ensemble(algo, [first], sampler, 20, 8, seed, "test")
    assert alone["acc_mean"] == plain["acc_mean"] and alone["acc_ci95"] == plain["acc_ci95"]

    torch.manual_seed(1)
    other = engine.build(compose_cfg("train", ENSEMBLE)).algo.state_dict()
    both = evaluate_ensemble(algo, [first, {"model": other, "iteration": 2}], sampler, 20, 20, seed, "test")
    sampler.generator.manual_seed(seed)
    episode = sampler.sample(20)  # the same 20 tasks, in one batch
    logits = []
    for member in (first["model"], other):
        algo.load_state_dict(member)
        logits.append(algo(episode, train=False).logits)
    want = accuracy((logits[0] + logits[1]) / 2, episode.query_y).double().mean().item()
    assert both["acc_mean"] == pytest.approx(want, abs=1e-12)
    alone = [accuracy(x, episode.query_y).double().mean().item() for x in logits]
    assert both["ensemble"]["member_acc_mean"] == pytest.approx(alone, abs=1e-12)

    # Through EvalGraphs' static tasks (eagerly on a CPU; replayed on CUDA), batches of 8, 8 and 4: the same numbers
    members = [first, {"model": other, "iteration": 2}]
    plain = evaluate_ensemble(algo, members, sampler, 20, 8, seed, "test")
    static = evaluate_ensemble(algo, members, sampler, 20, 8, seed, "test", EvalGraphs(algo, capture=False))
    assert static == plain


def test_training_tests_its_top_checkpoints_and_eval_and_resume_reproduce_it(compose_cfg, tmp_path):
    straight, resumed, _, _ = straight_and_resumed(compose_cfg, tmp_path, ENSEMBLE)
    listed = json.loads((tmp_path / "straight" / "checkpoints" / "top.json").read_text())
    assert straight["test"]["ensemble"]["iterations"] == [e["iteration"] for e in listed] and len(listed) == 3
    assert [e["val_score"] for e in listed] == sorted((e["val_score"] for e in listed), reverse=True)
    assert resumed["test"] == straight["test"]
    assert json.loads((tmp_path / "split" / "checkpoints" / "top.json").read_text()) == listed
    best = tmp_path / "straight" / "checkpoints" / "best.pt"
    again = eval_run(compose_cfg("eval", [f"checkpoint={best}", "device=cpu"]), tmp_path / "ev")
    assert again["test"] == straight["test"]
    assert "3 best validation checkpoints" in (tmp_path / "straight" / "results.md").read_text()


def test_an_algorithm_without_logits_is_refused_before_training(compose_cfg):
    with pytest.raises(ConfigError, match="eval.ensemble=2 .* algo=maml does not report"):
        _run(compose_cfg, [*TINY, "algo=maml", "eval.ensemble=2"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the batches are captured there)")
def test_ensemble_replays_its_batches_on_cuda(compose_cfg):
    """Captured for real: each member's weights are loaded in place and the captured batches replayed, with the
    logits the eager ensemble averages (a replay's outputs are copied before the next one overwrites them)."""
    run = _run(compose_cfg, [o for o in ENSEMBLE if not o.startswith("device=")] + ["device=cuda"])
    algo, sampler = run.algo, engine.make_sampler(run, "test")
    first = {"model": {k: v.clone() for k, v in algo.state_dict().items()}, "iteration": 1}
    torch.manual_seed(1)
    other = {"model": {k: v.cuda() for k, v in engine.build(compose_cfg("train", ENSEMBLE)).algo.state_dict().items()}}
    members, seed = [first, {**other, "iteration": 2}], engine.episode_seed(run.settings.seed, "test")
    plain = evaluate_ensemble(algo, members, sampler, 20, 8, seed, "test")
    graphs = EvalGraphs(algo)
    replayed = evaluate_ensemble(algo, members, sampler, 20, 8, seed, "test", graphs)
    assert all(entry[1] is not None for entry in graphs.entries.values()), "never captured"
    assert abs(replayed["acc_mean"] - plain["acc_mean"]) < 0.01, (replayed, plain)
