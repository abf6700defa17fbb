"""The meta-training loop: sample a meta-batch, step, validate, checkpoint; then test the best checkpoint.

It reads no config: everything comes from the Run that the build step made (fewshot.engine.builder)."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from fewshot.bars import tqdm
from fewshot.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_rng_state
from fewshot.device import device_label
from fewshot.engine.builder import Run, episode_seed, make_sampler, warn_if_graph_too_big
from fewshot.engine.checkpoints import (
    check_same_run,
    checkpoint_state,
    find_resume_checkpoint,
    save_last,
    truncate_metrics,
)
from fewshot.engine.ensemble import keep_top
from fewshot.engine.evaluation import eval_graphs, evaluate, evaluate_test, tested_record
from fewshot.engine.results import append_csv, make_logger, make_results, plot_curve, write_results
from fewshot.engine.signals import Interrupted, SignalGuard
from fewshot.engine.steps import DIVERGED, make_step  # noqa: F401  (DIVERGED: re-exported)
from fewshot.errors import FewshotError
from fewshot.metrics import METRICS


@dataclass
class Progress:
    """The loop's running state besides weights and optimizer: sums since the last validation (for metrics.csv and
    the progress bar), the training time with validation excluded, the first loss (divergence is measured against
    it), the metric's name and the kinds of device training ran on, in order (a run resumed on another kind of GPU,
    e.g. across leases, names each; train_seconds sums their times). Checkpoints hold it as a dict; `acc` is the
    score's key there, as it always was."""

    loss: float = 0.0
    score: float = 0.0
    n: int = 0
    train_seconds: float = 0.0
    metric: str = "acc"
    first_loss: Optional[float] = None
    val_seconds: float = 0.0  # validation's time, kept apart from train_seconds
    devices: list[str] = field(default_factory=list)

    def ran_on(self, label: str) -> None:
        """Record that training (re)starts on this device, once per change of device."""
        if not self.devices or self.devices[-1] != label:
            self.devices.append(label)

    def add(self, loss: torch.Tensor | float, score: torch.Tensor | float, metric: str) -> None:
        """Device tensors stay on the device (no host synchronisation per iteration) until window() reads them."""
        self.loss, self.score, self.n, self.metric = self.loss + loss, self.score + score, self.n + 1, metric

    def window(self) -> tuple[float, float]:
        """Mean loss and score since the last validation."""
        return float(self.loss) / self.n, float(self.score) / self.n

    def reset_window(self) -> None:
        self.loss, self.score, self.n = 0.0, 0.0, 0

    def state_dict(self, extra_seconds: float = 0.0) -> dict:
        state = {
            "loss": float(self.loss),
            "acc": float(self.score),
            "n": self.n,
            "metric": self.metric,
            "train_seconds": self.train_seconds + extra_seconds,
            "val_seconds": self.val_seconds,
            "devices": list(self.devices),
        }
        return state if self.first_loss is None else {**state, "first_loss": self.first_loss}

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(
            loss=state["loss"],
            score=state["acc"],
            n=state["n"],
            train_seconds=state["train_seconds"],
            metric=state.get("metric", "acc"),
            first_loss=state.get("first_loss"),
            val_seconds=state.get("val_seconds", 0.0),
            # Checkpoints from before devices were recorded: say so rather than credit the resuming device alone.
            devices=list(state.get("devices", ["a device not recorded"])),
        )


def meta_train(run: Run, run_dir: Path, signals: SignalGuard) -> dict[str, Any]:
    """Meta-train, validate and checkpoint, then test the best checkpoint; returns results.json's content.

    Resumes from run_dir/checkpoints/last.pt when it exists (or fails when the run asks to resume and it does
    not). The caller holds the run folder and the signal guard (fewshot.train)."""
    algo, t = run.algo, run.settings
    warn_if_graph_too_big(run)

    train_sampler = make_sampler(run, "train")
    val_sampler = make_sampler(run, "val")
    optimizer = run.optimizer(algo.parameters())
    scheduler = run.scheduler(optimizer)
    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.csv"
    best = {"val_score": -math.inf, "iteration": 0}  # val_score: Metric.score, higher is better
    # Running sums since the last validation, and the time spent training (validation excluded).
    progress = Progress()
    start = 1

    def state_at(it: int, extra_seconds: float = 0.0) -> dict:
        return checkpoint_state(run, optimizer, it, best, train_sampler, progress.state_dict(extra_seconds), scheduler)

    tested = f"{t.test_weights}.pt"  # the checkpoint the test reads (eval.weights)
    state = find_resume_checkpoint(ckpt_dir)
    retest: list[str] = []  # test-only changes since training (a finished run tested another way)
    if state is None and t.resume:
        raise CheckpointError(
            f"resume=true but {ckpt_dir} holds no last.pt; point hydra.run.dir at the run folder to resume"
        )
    if state is not None:
        retest = check_same_run(state, run.config, ckpt_dir / "last.pt")
        algo.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state.get("scheduler") or scheduler.state_dict())
        train_sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        best, progress, start = state["best"], Progress.from_state(state["progress"]), state["iteration"] + 1
        truncate_metrics(metrics_path, state["iteration"])
        signals.last_checkpoint = f"the last checkpoint is {ckpt_dir / 'last.pt'} (iteration {state['iteration']})"
        if start > t.iterations:
            print(f"fewshot: {run_dir} finished training at iteration {state['iteration']}; testing {tested} only")
        else:
            print(f"fewshot: resuming {run_dir} at iteration {start} of {t.iterations}")
    if start <= t.iterations:
        progress.ran_on(device_label(run.device))
    logger = make_logger(t.logger, run_dir)
    algo.train()

    signals.immediate = None  # from here the first signal checkpoints at the end of its iteration
    bar = tqdm(  # counted by update(), not by iterating: a redraw between two of its intervals shows the real count
        initial=start - 1,
        total=t.iterations,
        desc="meta-train",
        unit="it",
        dynamic_ncols=True,
    )
    tic, tic_it = time.perf_counter(), start - 1  # training time and tasks/s since the last validation
    graphs = eval_graphs(run)
    step = make_step(
        t.cuda_graph, run.device, algo, train_sampler, optimizer, scheduler, t.meta_batch_size, t.grad_clip,
        progress, ckpt_dir,
    )  # fmt: skip
    try:
        for it in range(start, t.iterations + 1):
            loss, score = step(it)  # on the device: read only at logging, validation and checkpoints
            bar.update()
            progress.add(loss, score, step.metric)
            last = it == t.iterations
            log, validate = it % t.log_every == 0 or last, it % t.val_every == 0 or last
            checkpoint = it % t.checkpoint_every == 0 or last
            checked = log or validate or checkpoint
            if checked:
                step.check()  # a divergence recorded on the device stops the run before anything is shown or saved
            if log:
                rate = (it - tic_it) * t.meta_batch_size / max(time.perf_counter() - tic, 1e-9)
                window_loss, window_score = progress.window()
                bar.set_postfix(  # shown at the bar's next redraw, which also brings its count up to date
                    {"loss": f"{window_loss:.3f}", progress.metric: f"{window_score:.3f}", "tasks/s": f"{rate:.0f}"},
                    refresh=False,
                )

            if validate:
                progress.train_seconds += time.perf_counter() - tic
                tic = time.perf_counter()
                val = evaluate(
                    algo, val_sampler, t.val_episodes, t.eval_batch, episode_seed(t.seed, "val"), "validate", graphs
                )
                progress.val_seconds += time.perf_counter() - tic
                metric = METRICS[progress.metric]
                m = metric.name
                if not math.isfinite(val[f"{m}_mean"]):  # it could never become best.pt: say so now
                    inner = algo.step_size_setting
                    lower = f"lower {inner} (or trainer.meta_lr)" if inner else "lower trainer.meta_lr"
                    raise FewshotError(
                        f"validation {metric.label} is {val[f'{m}_mean']} at iteration {it}: the "
                        f"{'adapted ' if inner else ''}model diverges; {lower}"
                    )
                train_loss, train_score = progress.window()
                row = {
                    "iteration": it,
                    "train_loss": train_loss,
                    f"train_{m}": train_score,
                    f"val_{m}": val[f"{m}_mean"],
                    "val_ci95": val[f"{m}_ci95"],
                    "train_seconds": round(progress.train_seconds, 3),
                }
                append_csv(metrics_path, row)
                if logger:
                    for key in ("train_loss", f"train_{m}", f"val_{m}"):
                        logger.add_scalar(key, row[key], it)
                progress.reset_window()
                score = metric.score(val[f"{m}_mean"])
                top = (
                    keep_top(best.get("top", []), score, it, t.ensemble, ckpt_dir, algo.state_dict)
                    if t.ensemble > 1
                    else None
                )
                if score > best["val_score"]:
                    best = {"val_score": score, f"val_{m}": val[f"{m}_mean"], "iteration": it}
                if top is not None:
                    best["top"] = top  # the test's ensemble (eval.ensemble), carried by every checkpoint
                if best["iteration"] == it:
                    save_checkpoint(ckpt_dir / "best.pt", state_at(it))
                shown = metric.show(val[f"{m}_mean"], val[f"{m}_ci95"])
                tqdm.write(f"iteration {it}: val {m} {shown} (best at iteration {best['iteration']})")
                tic, tic_it = time.perf_counter(), it
            if checkpoint or signals:  # a signal may come during validation: checkpoint at the end of its iteration
                if not checked:
                    step.check()
                # Time is banked only at validations; a checkpoint between them records it too.
                save_last(ckpt_dir, state_at(it, extra_seconds=time.perf_counter() - tic))
                signals.last_checkpoint = f"the last checkpoint is {ckpt_dir / 'last.pt'} (iteration {it})"
            if signals:
                name = signal.Signals(signals.received[0]).name
                raise Interrupted(
                    f"{name} at iteration {it}: checkpoint written to {ckpt_dir / 'last.pt'}; "
                    f"resume with the same command and hydra.run.dir={run_dir}",
                    signals.received[0],
                )
    finally:  # an error or a second signal leaves the loop too: the bar ends here, not at exit
        bar.close()
    if start <= t.iterations:
        progress.train_seconds += time.perf_counter() - tic

    # Test the best validation checkpoint, as most papers do, or the final weights (eval.weights=last). Nothing to
    # save here: a signal stops at once.
    signals.immediate = (
        f"during the test: training is complete ({ckpt_dir / tested}); run the same command "
        f"with hydra.run.dir={run_dir} to test it again"
    )
    weights = load_checkpoint(ckpt_dir / tested)
    algo.load_state_dict(weights["model"])
    test_sampler = make_sampler(run, "test")
    tic = time.perf_counter()
    seed = episode_seed(t.seed, "test")
    test = evaluate_test(algo, test_sampler, t, seed, "test", graphs, ckpt_dir, best.get("top"))
    results = make_results(
        run,
        test,
        progress.train_seconds,
        best,
        val_seconds=progress.val_seconds,
        test_seconds=time.perf_counter() - tic,
        train_devices=progress.devices,
    )
    results["tested"] = tested_record(algo, tested, weights["iteration"])
    if retest:  # its validation (metrics.csv, best_val) ran as trained, before these
        results["tested"]["changed_since_training"] = retest
    write_results(run_dir, results)
    if logger:
        m = METRICS[progress.metric].name
        logger.add_scalar(f"test_{m}", test[f"{m}_mean"], t.iterations)
        logger.close()
    plot_curve(run_dir)
    return results
