"""Accuracy (or MSE) over fixed task sets: validation, the final test, and fewshot-eval of a checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from fewshot.algorithms.base import Algorithm
from fewshot.atomic import atomic_write_text
from fewshot.bars import tqdm
from fewshot.checkpoint import fixed_rng
from fewshot.data.sampler import EpisodeSampler, batch_sizes
from fewshot.engine.builder import TEST_STEP_KEYS, EvalRequest, Run, Settings, episode_seed, make_sampler
from fewshot.engine.ensemble import evaluate_ensemble, load_top
from fewshot.engine.graphs import EvalGraphs
from fewshot.engine.results import make_results, write_results
from fewshot.errors import ConfigError
from fewshot.metrics import episode_summary


def evaluate(
    algo: Algorithm,
    sampler: EpisodeSampler,
    episodes: int,
    batch: int,
    seed: int,
    desc: str = "eval",
    graphs: Optional[EvalGraphs] = None,
) -> dict[str, Any]:
    """The algorithm's per-task score over a fixed set of `episodes` tasks (the same tasks for the same seed).

    Returns the metric's name and, for accuracy (fractions in [0, 1]), acc_mean, acc_ci95 = 1.96 * std /
    sqrt(episodes) and, for algorithms that report it, step_acc: the mean before adaptation and after each inner
    step (instance_acc for a score per instance of each class: MANN); another metric (MSE) the same way under its
    own name. graphs: replay the batches as CUDA graphs (eval.cuda_graph; the same tasks, the same code)."""
    was_training = algo.training
    algo.eval()
    values, steps, metric, kind = [], [], "acc", "step"  # the names the algorithm reports (fewshot.metrics)
    device = next(algo.parameters()).device
    with tqdm(total=episodes, desc=desc, unit="task", leave=False, dynamic_ncols=True) as bar, fixed_rng(seed, device):
        sampler.generator.manual_seed(seed)
        for n in batch_sizes(episodes, batch):
            out = algo(sampler.sample(n), train=False) if graphs is None else graphs(sampler, n)
            metric, kind = out.metric, out.step_kind
            values.append(out.per_task().detach())  # kept on the device: one host transfer at the end
            if out.per_step() is not None:
                steps.append(out.per_step().detach())
            bar.update(n)
    algo.train(was_training)
    result: dict[str, Any] = episode_summary(torch.cat(values).double().cpu(), metric)  # (episodes,) scores
    if steps:
        result[f"{kind}_{metric}"] = torch.cat(steps).double().mean(0).cpu().tolist()
    return result


def evaluate_test(
    algo: Algorithm,
    sampler: EpisodeSampler,
    t: Settings,
    seed: int,
    desc: str,
    graphs: Optional[EvalGraphs],
    ckpt_dir: Path,
    top: Optional[list[dict]] = None,
) -> dict[str, Any]:
    """The test as the run asks for it: the loaded weights (evaluate), or with eval.ensemble > 1 the logits of the
    run's N best validation checkpoints in ckpt_dir averaged (`top`, default the list in top.json)."""
    if t.ensemble > 1:
        members = load_top(ckpt_dir, top)
        return evaluate_ensemble(algo, members, sampler, t.test_episodes, t.eval_batch, seed, desc, graphs)
    return evaluate(algo, sampler, t.test_episodes, t.eval_batch, seed, desc, graphs)


def eval_graphs(run: Run) -> Optional[EvalGraphs]:
    """The run's validation/test graphs when eval.cuda_graph asks for them and the run is on CUDA."""
    return EvalGraphs(run.algo) if run.settings.eval_graph and run.device.type == "cuda" else None


def test_checkpoint(run: Run, state: dict, request: EvalRequest, out_dir: Path) -> dict[str, Any]:
    """fewshot-eval on a run rebuilt from a checkpoint (fewshot.engine.builder.build_from_checkpoint): its split's
    fixed tasks, or a benchmark. With the training run's seed and episodes it reproduces results.json's test."""
    run.algo.load_state_dict(state["model"])
    if request.benchmark is not None:
        return lake_benchmark(run, state, request, out_dir)
    t = run.settings
    sampler = make_sampler(run, request.split)
    ensemble = f", the {t.ensemble} best validation checkpoints beside it averaged" if t.ensemble > 1 else ""
    print(
        f"fewshot: {t.name} from {request.checkpoint} (iteration {state['iteration']}){ensemble} on {run.device}, "
        f"{t.test_episodes} {request.split} episodes, seed {t.seed}"
    )
    tic = time.perf_counter()
    seed, ckpt_dir = episode_seed(t.seed, request.split), Path(request.checkpoint).parent
    test = evaluate_test(run.algo, sampler, t, seed, request.split, eval_graphs(run), ckpt_dir)
    results = make_results(run, test, None, state["best"], test_seconds=time.perf_counter() - tic)
    results["checkpoint"] = str(Path(request.checkpoint).resolve())
    results["eval_split"] = request.split
    results["tested"] = tested_record(run.algo, Path(request.checkpoint).name, state["iteration"])
    write_results(out_dir, results)
    return results


def tested_record(algo: Algorithm, checkpoint: str, iteration: int) -> dict[str, Any]:
    """results.json's `tested`: the checkpoint file the test read, the iteration its weights were saved at, and the
    inner steps it adapted with, for the algorithms that take them (TEST_STEP_KEYS: MAML, Reptile, the Meta-LSTM...)."""
    tested = {"checkpoint": checkpoint, "iteration": iteration}
    steps = next((getattr(algo, k) for k in TEST_STEP_KEYS if getattr(algo, k, None) is not None), None)
    if steps is not None:
        tested["inner_steps"] = steps
    return tested


def lake_benchmark(run: Run, state: dict, request: EvalRequest, out_dir: Path) -> dict[str, Any]:
    """benchmark=lake_runs: Lake et al.'s 20 original one-shot runs (20-way, one drawing per class, 20 trials
    each), preprocessed as the model's training data, reported as error rates per run as Lake reports them."""
    from fewshot.benchmarks.lake import lake_episode, lake_report, lake_zip_path, load_lake_runs

    if request.benchmark != "lake_runs":
        raise ConfigError(
            f"benchmark={request.benchmark!r}: the only benchmark is lake_runs (or null for the test split)"
        )
    if run.record["dataset"] != "omniglot":
        raise ConfigError(
            f"benchmark=lake_runs needs an Omniglot model; {request.checkpoint} was trained on {run.record['dataset']}"
        )
    fixed = getattr(run.algo, "fixed_ways", None)
    if fixed is not None and fixed != 20:
        raise ConfigError(
            f"benchmark=lake_runs is 20-way but this {run.record['algo']} model has a {fixed}-way head; "
            "evaluate a 20-way model (e.g. experiment=maml_omniglot_20w1s)"
        )
    runs = load_lake_runs(lake_zip_path(run.record["data_root"]), image_size=run.record["image_size"])
    episode = lake_episode(runs, mean=run.dataset.mean, std=run.dataset.std, device=run.device)
    run.algo.eval()
    with fixed_rng(run.settings.seed, run.device):
        acc = run.algo(episode, train=False).acc.detach().cpu().tolist()  # (20,) one task per run
    report = lake_report(acc, runs)
    results = make_results(
        run,
        {"episodes": len(runs), "metric": "acc", "acc_mean": report["mean_accuracy"], "acc_ci95": None},
        train_seconds=None,
        best=state["best"],
    )
    results.update(
        checkpoint=str(Path(request.checkpoint).resolve()),
        eval_split="lake_runs",
        lake={"error_per_run": report["error_per_run"], "mean_error": report["mean_error"]},
        tested=tested_record(run.algo, Path(request.checkpoint).name, state["iteration"]),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / "results.md", report["markdown"])
    print(report["markdown"], end="")
    # The runs are drawn from images_evaluation: a split that trains on those alphabets may have seen them.
    print(f"Lake's one-shot runs: mean error {report['mean_error']:.2f}% over {len(runs)} runs")
    return results
