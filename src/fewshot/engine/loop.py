"""The meta-training loop: sample a meta-batch, step, validate, checkpoint; then test the best checkpoint."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from fewshot.atomic import remove_stale_temporaries
from fewshot.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from fewshot.engine.builder import (
    build,
    episode_seed,
    make_sampler,
    seed_everything,
    warn_if_graph_too_big,
)
from fewshot.engine.checkpoints import (
    check_same_run,
    checkpoint_state,
    find_resume_checkpoint,
    save_last,
    truncate_metrics,
)
from fewshot.engine.evaluation import evaluate, validation_score
from fewshot.engine.results import (
    _append_csv,
    make_logger,
    make_results,
    plot_curve,
    write_hydra_files,
    write_results,
)
from fewshot.engine.signals import Interrupted, SignalGuard, stop_on_signals
from fewshot.errors import FewshotError
from fewshot.runlock import hold_run_folder
from fewshot.schedule import make_scheduler


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Meta-train, validate and checkpoint, then test the best checkpoint; returns results.json's content.

    Resumes from run_dir/checkpoints/last.pt when it exists (or fails when resume=true and it does not).
    The run owns its folder throughout: a second run on it stops with RunFolderInUse instead of mixing files."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with hold_run_folder(run_dir, "fewshot-train"):
        # Locked: no other live run writes here, so our files' temporaries are a killed writer's leftovers.
        remove_stale_temporaries(run_dir / "checkpoints")
        remove_stale_temporaries(run_dir, "metrics.csv", "results.json", "results.md")
        write_hydra_files(run_dir, cfg)
        return _train_locked(cfg, run_dir)


def _train_locked(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    with stop_on_signals() as signals:
        signals.immediate = "while preparing the run: nothing was trained yet; run the same command again"
        return _meta_train(cfg, run_dir, signals)


# A training loss this many times its first value (or more than this, for a first loss below 1) means the run
# has diverged: it will not come back, and an infinite loss may take long to appear (meta_lr=1e9 reached 1.7e19).
DIVERGED = 100.0


def _meta_train(cfg: DictConfig, run_dir: Path, signals: SignalGuard) -> dict[str, Any]:
    seed_everything(cfg.seed)
    run = build(cfg)
    algo, t = run.algo, cfg.trainer
    print(f"fewshot: {cfg.name} on {run.device}, {sum(p.numel() for p in algo.parameters()):,} parameters, run folder {run_dir}")
    if cfg.dry_run:
        print(OmegaConf.to_yaml(cfg))
        return {}
    warn_if_graph_too_big(run, cfg)

    train_sampler = make_sampler(run, cfg, "train", episode_seed(cfg.seed, "train"))
    val_sampler = make_sampler(run, cfg, "val", episode_seed(cfg.seed, "val"))
    optimizer = torch.optim.Adam(algo.parameters(), lr=t.meta_lr)
    scheduler = make_scheduler(cfg.get("schedule"), optimizer)
    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.csv"
    best = {"val_score": -math.inf, "iteration": 0}  # val_score: accuracy, or -MSE for regression
    # Running sums since the last validation, and the time spent training (validation excluded).
    progress = {"loss": 0.0, "acc": 0.0, "n": 0, "train_seconds": 0.0, "metric": "acc"}
    start = 1

    state = find_resume_checkpoint(ckpt_dir)
    if state is None and cfg.resume:
        raise CheckpointError(f"resume=true but {ckpt_dir} holds no last.pt; point hydra.run.dir at the run folder to resume")
    if state is not None:
        check_same_run(state, cfg, ckpt_dir / "last.pt")
        algo.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state.get("scheduler") or scheduler.state_dict())
        train_sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        best, progress, start = state["best"], state["progress"], state["iteration"] + 1
        truncate_metrics(metrics_path, state["iteration"])
        signals.last_checkpoint = f"the last checkpoint is {ckpt_dir / 'last.pt'} (iteration {state['iteration']})"
        if start > t.iterations:
            print(f"fewshot: {run_dir} finished training at iteration {state['iteration']}; testing best.pt only")
        else:
            print(f"fewshot: resuming {run_dir} at iteration {start} of {t.iterations}")
    logger = make_logger(cfg.logger, run_dir)
    algo.train()

    signals.immediate = None  # from here the first signal checkpoints at the end of its iteration
    bar = tqdm(range(start, t.iterations + 1), initial=start - 1, total=t.iterations, desc="meta-train", unit="it",
               dynamic_ncols=True)
    tic, tic_it = time.perf_counter(), start - 1  # training time and tasks/s since the last validation
    for it in bar:
        episode = train_sampler.sample(t.meta_batch_size)  # support_x (T, ways*shots, C, H, W)
        out = algo(episode, train=True)
        loss = out.loss.item()
        first = progress.setdefault("first_loss", loss)
        # Checked before the step, so the weights stay the last good ones.
        if not math.isfinite(loss) or abs(loss) > DIVERGED * max(abs(first), 1.0):
            what = f"became {loss}" if not math.isfinite(loss) else f"reached {loss:.3g} (it started at {first:.3g})"
            raise FewshotError(f"training loss {what} at iteration {it}: the run diverged and stopped; the last good "
                               f"checkpoint is in {ckpt_dir}. Lower trainer.meta_lr or algo.inner_lr")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(algo.parameters(), t.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

        progress["loss"] += loss
        progress["metric"] = out.metric
        progress["acc"] += out.per_task().mean().item()
        progress["n"] += 1
        if it % t.log_every == 0 or it == t.iterations:
            rate = (it - tic_it) * t.meta_batch_size / max(time.perf_counter() - tic, 1e-9)
            bar.set_postfix({"loss": f"{progress['loss'] / progress['n']:.3f}",
                             progress["metric"]: f"{progress['acc'] / progress['n']:.3f}", "tasks/s": f"{rate:.0f}"})

        if it % t.val_every == 0 or it == t.iterations:
            progress["train_seconds"] += time.perf_counter() - tic
            val = evaluate(algo, val_sampler, t.val_episodes, cfg.eval.meta_batch_size, episode_seed(cfg.seed, "val"), desc="validate")
            m = progress["metric"]
            row = {"iteration": it, "train_loss": progress["loss"] / progress["n"], f"train_{m}": progress["acc"] / progress["n"],
                   f"val_{m}": val[f"{m}_mean"], "val_ci95": val[f"{m}_ci95"], "train_seconds": round(progress["train_seconds"], 3)}
            _append_csv(metrics_path, row)
            if logger:
                for key in ("train_loss", f"train_{m}", f"val_{m}"):
                    logger.add_scalar(key, row[key], it)
            progress.update(loss=0.0, acc=0.0, n=0)
            if validation_score(val) > best["val_score"]:
                best = {"val_score": validation_score(val), f"val_{m}": val[f"{m}_mean"], "iteration": it}
                save_checkpoint(ckpt_dir / "best.pt", checkpoint_state(cfg, algo, optimizer, it, best, train_sampler, progress, scheduler))
            shown = (f"{100 * val['acc_mean']:.2f} ± {100 * val['acc_ci95']:.2f}%" if m == "acc"
                     else f"{val['mse_mean']:.4f} ± {val['mse_ci95']:.4f}")
            tqdm.write(f"iteration {it}: val {m} {shown} (best at iteration {best['iteration']})")
            tic, tic_it = time.perf_counter(), it
        if it % t.checkpoint_every == 0 or it == t.iterations or signals:
            # Time is banked only at validations; a checkpoint between them records it too.
            snapshot = dict(progress, train_seconds=progress["train_seconds"] + time.perf_counter() - tic)
            save_last(ckpt_dir, checkpoint_state(cfg, algo, optimizer, it, best, train_sampler, snapshot, scheduler))
            signals.last_checkpoint = f"the last checkpoint is {ckpt_dir / 'last.pt'} (iteration {it})"
        if signals:
            bar.close()
            name = signal.Signals(signals.received[0]).name
            raise Interrupted(f"{name} at iteration {it}: checkpoint written to {ckpt_dir / 'last.pt'}; "
                              f"resume with the same command and hydra.run.dir={run_dir}", signals.received[0])
    bar.close()
    if start <= t.iterations:
        progress["train_seconds"] += time.perf_counter() - tic

    # Test the best validation checkpoint, as the papers do. Nothing to save here: a signal stops at once.
    signals.immediate = (f"during the test: training is complete ({ckpt_dir / 'best.pt'}); run the same command "
                         f"with hydra.run.dir={run_dir} to test it again")
    algo.load_state_dict(load_checkpoint(ckpt_dir / "best.pt")["model"])
    test_sampler = make_sampler(run, cfg, "test", episode_seed(cfg.seed, "test"))
    test = evaluate(algo, test_sampler, cfg.eval.episodes, cfg.eval.meta_batch_size, episode_seed(cfg.seed, "test"), desc="test")
    results = make_results(cfg, test, train_seconds=progress["train_seconds"], best=best, device=run.device)
    write_results(run_dir, results)
    if logger:
        for key in ("acc_mean", "mse_mean"):
            if key in test:
                logger.add_scalar(f"test_{key.split('_')[0]}", test[key], t.iterations)
        logger.close()
    plot_curve(run_dir)
    return results
