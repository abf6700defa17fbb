"""What a run writes besides checkpoints: results.json/md, metrics.csv, .hydra/, TensorBoard, the curve."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from fewshot.atomic import atomic_write_text
from fewshot.device import device_label
from fewshot.engine.builder import Run
from fewshot.errors import ConfigError
from fewshot.metrics import METRICS


def make_logger(kind: Optional[str], run_dir: Path):
    """Optional TensorBoard writer; metrics.csv is always written."""
    if not kind:
        return None
    if kind != "tensorboard":
        raise ConfigError(f"logger={kind!r}: the only logger is tensorboard (or null)")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("logger=tensorboard needs the tensorboard package: pip install 'fewshot[tensorboard]'") from e
    return SummaryWriter(str(run_dir / "tensorboard"))


def plot_curve(run_dir: Path) -> None:
    try:
        from fewshot.plots import plot_learning_curve
    except ImportError:  # matplotlib missing: the numbers are in metrics.csv anyway
        return
    try:
        plot_learning_curve(run_dir)
    except Exception as e:  # a plot must never cost a finished run its results
        print(f"fewshot: warning: learning-curve plot failed: {e}", file=sys.stderr)


def make_results(
    run: Run,
    test: dict,
    train_seconds: Optional[float],
    best: dict,
    val_seconds: Optional[float] = None,
    test_seconds: Optional[float] = None,
    train_devices: Optional[list[str]] = None,
) -> dict[str, Any]:
    """results.json: the run's cell (test tasks: ways/shots/queries are the paper cell's; training tasks may differ,
    ProtoNets train 60-way), its budget, where and when it ran, the command that gives it again, and the test.
    train_seconds excludes validation (val_seconds) and the test (test_seconds). train_devices: the kinds of device
    meta-training ran on, in order (a run resumed on another kind of GPU names each; `device`: where the test ran)."""
    t, device = run.settings, run.device
    return {
        "name": t.name,
        "algo": run.record["algo"],
        "dataset": run.record["dataset"],
        "dataset_split": run.record["dataset_split"],
        "backbone": run.record["backbone"],
        "ways": t.eval.ways,
        "shots": t.eval.shots,
        "queries": t.eval.queries,
        "train_episode": {"ways": t.train.ways, "shots": t.train.shots, "queries": t.train.queries},
        "seed": t.seed,
        "iterations": t.iterations,
        "meta_batch_size": t.meta_batch_size,
        **{
            f"{part}_seconds": None if seconds is None else round(seconds, 3)
            for part, seconds in (("train", train_seconds), ("val", val_seconds), ("test", test_seconds))
        },
        "best_val": best,
        "device": device_label(device),
        "channels_last": run.record["channels_last"],  # the layout the run ended and tested in
        "keep_freed_memory": run.record["keep_freed_memory"],  # in the last process; a speed setting, as the seconds
        **({} if train_devices is None else {"train_devices": train_devices}),
        "optim": run.record["optim"],
        "schedule": run.record["schedule"],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": run_command(),
        "config": settings_record(run.config, run.config_source),
        "test": test,
        "paper": run.record["paper"],
    }


# Keys that hold where files live, under any group (dataset.root=/abs/omniglot typed as a plain path).
PATH_KEYS = ("data_root", "cache_dir", "root", "split_dir")


def settings_record(config: dict, source: dict) -> dict:
    """results.json's `config`: the resolved settings a run trained and tested with (Run.config), which
    fewshot.ledger checks a run against its preset by long after the preset file has changed. Left out: the paper's
    numbers, the preset's revisions, and paths, by name (PATH_KEYS) or by their unresolved value (Run.config_source)
    being built from data_root, cache_dir or the environment."""

    def is_path(key: str, raw: Any) -> bool:
        return key in PATH_KEYS or (
            isinstance(raw, str) and any(v in raw for v in ("${data_root", "${cache_dir", "${oc.env"))
        )

    def keep(node: dict, raw: dict) -> dict:
        return {
            k: keep(v, raw.get(k) or {}) if isinstance(v, dict) else v
            for k, v in node.items()
            if not is_path(k, raw.get(k))
        }

    return {k: v for k, v in keep(config, source).items() if k not in ("paper", "revisions")}


def run_command() -> Optional[str]:
    """The command line that gives this run again (the job's own overrides under a sweep), or None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    prog = "fewshot-eval" if hydra_cfg.job.config_name == "eval" else "fewshot-train"
    return " ".join([prog, *hydra_cfg.overrides.task])


def results_markdown(results: dict) -> str:
    """results.md: one table row (with the paper's number where the preset quotes one), the score after each
    inner step for the algorithms that adapt, and a per-instance table for sequence models (MANN), with the paper's
    row where the preset quotes one for sequences of the same length."""
    test = results["test"]
    metric = METRICS[test.get("metric", "acc")]
    m = metric.name
    paper = results.get("paper") or {}
    paper_s = "–"
    if paper.get(m) is not None:
        paper_s = f"{paper[m]:.2f}" + (f" ± {paper['ci95']:.2f}" if paper.get("ci95") is not None else "")
    shown = metric.show(test[f"{m}_mean"], test[f"{m}_ci95"]).rstrip("%")
    unit = f"{metric.label} (%)" if metric.percent else metric.label
    paper_h = "paper (%)" if metric.percent else "paper"
    lines = [
        f"| algo | dataset | backbone | ways | shots | queries | seed | test episodes | {unit} | {paper_h} |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {results['algo']} | {results['dataset']} | {results['backbone']} | {results['ways']} | "
        f"{results['shots']} | {results['queries']} | {results['seed']} | {test['episodes']} | {shown} | {paper_s} |",
    ]
    if f"step_{m}" in test:
        steps = ", ".join(f"{i}: {metric.show(v, None).rstrip('%')}" for i, v in enumerate(test[f"step_{m}"]))
        lines += ["", f"{unit[0].upper() + unit[1:]} after each inner step: {steps}"]
    if "ensemble" in test:  # eval.ensemble: MAML++'s test
        members = test["ensemble"]
        alone = ", ".join(
            f"{it}: {metric.show(v, None).rstrip('%')}"
            for it, v in zip(members["iterations"], members["member_acc_mean"])
        )
        lines += [
            "",
            f"Test: the final query logits of the {len(members['iterations'])} best validation checkpoints averaged; "
            f"each alone (iteration: {unit}): {alone}",
        ]
    if f"instance_{m}" in test:  # MANN's sequences: the score at the k-th instance of each class, as Santoro et al.
        values = test[f"instance_{m}"]
        lines += [
            "",
            f"{unit[0].upper() + unit[1:]} at the k-th instance of each class:",
            "",
            f"| instance | {' | '.join(str(k) for k in range(1, len(values) + 1))} |",
            "|---" * (len(values) + 1) + "|",
            f"| {unit} | {' | '.join(metric.show(v, None).rstrip('%') for v in values)} |",
        ]
        columns = paper.get(f"instance_{m}") or []  # the preset's paper columns: only for sequences as long
        if len(columns) == len(values):
            lines.append(f"| {paper_h} | {' | '.join('–' if v is None else f'{v:.2f}' for v in columns)} |")
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, results: dict) -> None:
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    table = results_markdown(results)
    atomic_write_text(run_dir / "results.md", table)
    print(table, end="")


def append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row), lineterminator="\n")  # as truncate_metrics writes it
        if new:
            writer.writeheader()
        writer.writerow(row)
