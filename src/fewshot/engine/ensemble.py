"""eval.ensemble: the test as MAML++'s reference runs it, with the final query logits of the N best validation
checkpoints averaged per task (AntreasAntoniou/HowToTrainYourMAMLPytorch, experiment_builder.py,
evaluated_test_set_using_the_best_models, top_n_models=5).

Training keeps checkpoints/top_<iteration>.pt (the weights) for the N best validations so far and lists them,
best first, in checkpoints/top.json, which fewshot-eval reads; a checkpoint pushed out of the top N is deleted.
The list also lives in every checkpoint's `best`, so a resumed run goes on with it. Ties keep the earlier
validation, as best.pt does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fewshot.algorithms.base import Algorithm, accuracy
from fewshot.atomic import atomic_write_text
from fewshot.bars import tqdm
from fewshot.checkpoint import CheckpointError, fixed_rng, load_checkpoint, save_checkpoint
from fewshot.data.sampler import EpisodeSampler, batch_sizes
from fewshot.engine.graphs import EvalGraphs
from fewshot.errors import ConfigError
from fewshot.metrics import episode_summary

TOP_LIST = "top.json"


def top_file(ckpt_dir: Path, iteration: int) -> Path:
    return ckpt_dir / f"top_{iteration}.pt"


def keep_top(
    top: list[dict], score: float, iteration: int, n: int, ckpt_dir: Path, weights: Callable[[], dict]
) -> list[dict]:
    """The top-n list after a validation scoring `score` (higher is better) at `iteration`: when it ranks, its
    weights are saved and the list rewritten; checkpoints no longer listed are deleted."""
    ranked = sorted([*top, {"iteration": iteration, "val_score": score}], key=lambda e: -e["val_score"])[:n]
    if all(e["iteration"] != iteration for e in ranked):
        return top
    save_checkpoint(top_file(ckpt_dir, iteration), {"model": weights(), "iteration": iteration, "val_score": score})
    atomic_write_text(ckpt_dir / TOP_LIST, json.dumps(ranked, indent=2) + "\n")
    kept = {top_file(ckpt_dir, e["iteration"]).name for e in ranked}
    for path in ckpt_dir.glob("top_*.pt"):  # pushed out, or left by a run killed before its last.pt
        if path.name not in kept:
            path.unlink()
    return ranked


def load_top(ckpt_dir: Path, top: Optional[list[dict]] = None) -> list[dict]:
    """The checkpoints of `top` (default: those top.json lists), best first."""
    if top is None:
        listed = ckpt_dir / TOP_LIST
        if not listed.is_file():
            raise CheckpointError(
                f"eval.ensemble needs {listed}, written by a run trained with eval.ensemble > 1; "
                "evaluate this run with eval.ensemble=1"
            )
        top = json.loads(listed.read_text())
    return [load_checkpoint(top_file(ckpt_dir, e["iteration"])) for e in top]


def evaluate_ensemble(
    algo: Algorithm,
    members: list[dict],
    sampler: EpisodeSampler,
    episodes: int,
    batch: int,
    seed: int,
    desc: str,
    graphs: Optional[EvalGraphs] = None,
) -> dict[str, Any]:
    """Accuracy over `episodes` fixed tasks (the same as evaluate's for this seed) of the members' averaged final
    query logits; beside it each member's own accuracy and iteration. graphs: as evaluate's; each member's weights
    are loaded in place, so one capture per batch shape serves them all."""
    was_training = algo.training
    algo.eval()
    device = next(algo.parameters()).device
    logits: list[list[torch.Tensor]] = []  # [member][batch] (n, ways*queries, ways)
    labels: list[torch.Tensor] = []
    with tqdm(total=episodes * len(members), desc=f"{desc} (ensemble)", unit="task", leave=False) as bar:
        for member in members:
            algo.load_state_dict(member["model"])
            sampler.generator.manual_seed(seed)
            logits.append([])
            with fixed_rng(seed, device):  # each member draws what evaluate would
                for n in batch_sizes(episodes, batch):
                    if graphs is None:
                        episode = sampler.sample(n)
                        out = algo(episode, train=False)
                    else:
                        out, episode = graphs(sampler, n), graphs.episode
                    if out.logits is None:
                        raise ConfigError(
                            f"eval.ensemble={len(members)}: {type(algo).__name__} does not report its query "
                            "logits (algo=maml_pp does); set eval.ensemble=1"
                        )
                    logits[-1].append(out.logits.detach())
                    if len(logits) == 1:
                        labels.append(episode.query_y.clone())  # static tasks are refilled by the next batch
                    bar.update(n)
    algo.train(was_training)
    y = torch.cat(labels)
    per_member = [torch.cat(m) for m in logits]  # (episodes, ways*queries, ways) each
    acc = accuracy(torch.stack(per_member).mean(0), y).double().cpu()  # (episodes,)
    return {
        **episode_summary(acc, "acc"),
        "ensemble": {
            "iterations": [m["iteration"] for m in members],
            "member_acc_mean": [accuracy(m, y).double().mean().item() for m in per_member],
        },
    }
