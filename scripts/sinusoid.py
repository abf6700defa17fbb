#!/usr/bin/env python
"""MAML's sinusoid regression against the pretrained baseline (Finn et al. 2017, Section 5.1), on CPU in minutes.

    python scripts/sinusoid.py                       # K=10, 8,000 iterations each (about 2-3 minutes, 2-core CPU)
    python scripts/sinusoid.py --shots 5 --iterations 70000          # the paper's budget (K=5)
    python scripts/sinusoid.py -- trainer.meta_lr=0.0005             # Hydra overrides for both runs after `--`

Both runs go through fewshot.train.run ( same task stream per seed, validation every --val-every iterations,
the best validation checkpoint is tested on 600 fixed tasks of K support points and 100 query points), with the
presets maml_sinusoid_k{5,10} and pretrain_sinusoid_k{5,10} and the same budget: iterations x 25 tasks.
The pretrained net is fine-tuned at test with alpha=0.01 as MAML is, and, as the paper does ("an automatically
tuned step size"), with the step size from --lrs that gives the lowest validation MSE after 10 steps.

Writes under --out (default outputs/sinusoid/k<K>_it<N>_seed<S>/): the two run folders, summary.json,
summary.md (test MSE after 0, 1 and 10 steps, mean ± 95% CI over the test tasks) and sinusoid.png (the paper's
Figure 2 for one test task: ground truth, pre-update, after 1 and 10 steps, the K points; MAML and pretrained
side by side; and Figure 3's MSE against the number of gradient steps).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from torch.func import functional_call

from fewshot import engine
from fewshot.checkpoint import load_checkpoint
from fewshot.config import register_configs
from fewshot.data.sampler import fixed_episodes
from fewshot.train import run as train_run

ALGOS = {"maml": "MAML", "pretrain": "pretrained"}
STEPS = (0, 1, 10)


def compose_cfg(algo: str, shots: int, args: argparse.Namespace, extra: list[str]) -> DictConfig:
    preset = f"{algo}_sinusoid_k{shots if shots in (5, 10) else 10}"
    overrides = [
        f"experiment={preset}",
        f"episode.shots={shots}",
        f"episode.queries={shots}",
        f"device={args.device}",
        f"seed={args.seed}",
        f"trainer.iterations={args.iterations}",
        f"eval.episodes={args.episodes}",
        f"trainer.val_every={args.val_every}",
        f"trainer.checkpoint_every={args.val_every}",
        f"name={algo}_sinusoid_k{shots}",
        *extra,
    ]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="fewshot.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def load_best(cfg: DictConfig, run_dir: Path) -> engine.Run:
    run = engine.build(cfg)
    run.algo.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"])
    run.algo.eval()
    return run


def step_mse(run: engine.Run, cfg: DictConfig, split: str, episodes: int) -> torch.Tensor:
    """(episodes, eval_inner_steps + 1): per-task query MSE before and after each step, on the engine's fixed
    tasks of `split` (the same tasks engine.evaluate scores)."""
    seed = engine.episode_seed(cfg.seed, split)
    sampler = engine.make_sampler(run, split, seed)
    rows = [
        run.algo(ep, train=False).step_mse.detach().cpu()
        for ep in fixed_episodes(sampler, episodes, cfg.eval.meta_batch_size, seed)
    ]
    return torch.cat(rows).double()


def summarize(per_task: torch.Tensor) -> dict:
    n = per_task.shape[0]
    mean, ci = per_task.mean(0), 1.96 * per_task.std(0, unbiased=True) / math.sqrt(n)
    return {"episodes": n, "step_mse": mean.tolist(), "step_ci95": ci.tolist()}


def tune_lr(run: engine.Run, cfg: DictConfig, lrs: list[float], episodes: int) -> tuple[float, dict]:
    """The fine-tuning step size with the lowest validation MSE after the last step (the paper's "automatically
    tuned step size" for the pretrained baseline); returns it and every candidate's validation MSE."""
    scores = {}
    for lr in lrs:
        run.algo.inner_lr = lr
        scores[lr] = step_mse(run, cfg, "val", episodes)[:, -1].mean().item()
    best = min(lrs, key=lambda lr: (scores[lr] if math.isfinite(scores[lr]) else math.inf, lr))
    return best, scores


def plot(panels: list[tuple[str, engine.Run, float]], task, curves: dict[str, dict], shots: int, out: Path) -> None:
    """Figure 2 (one test task, one panel per model) and Figure 3 (MSE against gradient steps) of the paper."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    episode, amplitude, phase = task
    x_s, y_s = episode.support_x[0], episode.support_y[0]
    grid = torch.linspace(-5, 5, 400, device=x_s.device).view(-1, 1)
    truth = (amplitude[0] * torch.sin(grid - phase[0])).cpu().view(-1)
    fig = Figure(figsize=(5.2 * (len(panels) + 1), 4.3), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + 1)
    for ax, (title, run, lr) in zip(axes, panels):
        algo = run.algo
        saved_lr, algo.inner_lr = algo.inner_lr, lr
        ax.plot(grid.cpu(), truth, color="tab:red", lw=2, label="ground truth")
        for steps, style, color in ((0, ":", "tab:green"), (1, "--", "tab:green"), (10, "-", "tab:green")):
            weights = algo.adapt(x_s, y_s, steps=steps)
            with torch.no_grad():
                pred = functional_call(algo.net, weights, (grid,)).cpu().view(-1)
            label = "pre-update" if steps == 0 else f"{steps} grad step" + ("s" if steps > 1 else "")
            ax.plot(
                grid.cpu(),
                pred,
                ls=style,
                color=color,
                lw=1.6 if steps else 1.3,
                alpha=0.55 if steps == 0 else 1,
                label=label,
            )
        algo.inner_lr = saved_lr
        ax.plot(
            x_s.cpu().view(-1), y_s.cpu().view(-1), "^", color="tab:purple", ms=9, label=f"{shots} points used for grad"
        )
        ax.set_title(f"{title}, K={shots}, step size {lr:g}", fontsize=10)
        ax.set_xlim(-5, 5)
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("y")
    ax = axes[-1]
    for name, c in curves.items():
        steps = list(range(len(c["step_mse"])))
        lo = [m - e for m, e in zip(c["step_mse"], c["step_ci95"])]
        hi = [m + e for m, e in zip(c["step_mse"], c["step_ci95"])]
        (line,) = ax.plot(steps, c["step_mse"], marker="o", ms=3, label=name)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel(f"test MSE, {next(iter(curves.values()))['episodes']} tasks (95% band)")
    ax.set_title(f"k-shot regression, K={shots}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")


def markdown(rows: list[dict], shots: int, iterations: int, episodes: int) -> str:
    head = (
        "| model | fine-tune step size | "
        + " | ".join(f"MSE after {s} step{'s' if s != 1 else ''}" for s in STEPS)
        + " |"
    )
    lines = [
        f"Sinusoid regression, K={shots}, {iterations} iterations x 25 tasks, test MSE on 100 points per task, "
        f"mean ± 95% CI over {episodes} tasks",
        "",
        head,
        "|---|---|" + "---|" * len(STEPS),
    ]
    for r in rows:
        cells = " | ".join(f"{r['step_mse'][s]:.3f} ± {r['step_ci95'][s]:.3f}" for s in STEPS)
        lines.append(f"| {r['model']} | {r['lr']:g} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shots", type=int, default=10, help="K support points per task (default 10)")
    p.add_argument(
        "--iterations",
        type=int,
        default=8000,
        help="meta-iterations of 25 tasks for each model (default 8000; the paper: 70000)",
    )
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--episodes", type=int, default=600, help="test tasks (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the MLP is tiny, and more threads only wait on each other)",
    )
    p.add_argument(
        "--lrs",
        default="0.001,0.002,0.005,0.01,0.02,0.05,0.1",
        help="fine-tuning step sizes tried for the pretrained net on validation tasks",
    )
    p.add_argument("--out", help="output folder (default outputs/sinusoid/k<K>_it<N>_seed<S>)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    register_configs()
    out = Path(args.out or f"outputs/sinusoid/k{args.shots}_it{args.iterations}_seed{args.seed}")
    lrs = [float(v) for v in args.lrs.split(",")]

    runs, rows, curves, timing = {}, [], {}, {}
    for algo in ALGOS:
        cfg = compose_cfg(algo, args.shots, args, extra)
        run_dir = out / algo
        tic = time.perf_counter()
        results = train_run(cfg, run_dir)
        timing[algo] = {"wall_seconds": round(time.perf_counter() - tic, 1), "train_seconds": results["train_seconds"]}
        run = load_best(cfg, run_dir)
        runs[algo] = (cfg, run)
        alpha = run.algo.inner_lr
        test = summarize(step_mse(run, cfg, "test", args.episodes))
        # The same tasks as the engine's test: the last step is results.json's number.
        assert abs(test["step_mse"][-1] - results["test"]["mse_mean"]) < 1e-4 * max(1.0, results["test"]["mse_mean"])
        rows.append({"model": ALGOS[algo], "algo": algo, "lr": alpha, **test, "best_val": results["best_val"]})
        curves[f"{ALGOS[algo]} (step {alpha:g})"] = test
        if algo == "pretrain":
            best_lr, scores = tune_lr(run, cfg, lrs, args.episodes)
            run.algo.inner_lr = best_lr
            tuned = summarize(step_mse(run, cfg, "test", args.episodes))
            scores = {f"{lr:g}": (v if math.isfinite(v) else None) for lr, v in scores.items()}  # None: diverged
            rows.append(
                {"model": "pretrained, tuned step", "algo": algo, "lr": best_lr, **tuned, "val_mse_by_lr": scores}
            )
            if best_lr != alpha:
                curves[f"pretrained (tuned step {best_lr:g})"] = tuned
            else:
                curves[f"pretrained (step {alpha:g}, also the tuned one)"] = curves.pop(f"pretrained (step {alpha:g})")
            run.algo.inner_lr = alpha

    # One test task (the first of the test set) for the paper's Figure 2.
    cfg, run = runs["maml"]
    sampler = engine.make_sampler(run, "test")
    task = sampler.sample_with_params(1)
    tuned_lr = rows[-1]["lr"]
    png = out / "sinusoid.png"
    plot(
        [("MAML", run, run.algo.inner_lr), ("pretrained", runs["pretrain"][1], tuned_lr)], task, curves, args.shots, png
    )

    table = markdown(rows, args.shots, args.iterations, args.episodes)
    summary = {
        "shots": args.shots,
        "iterations": args.iterations,
        "meta_batch_size": 25,
        "seed": args.seed,
        "device": args.device,
        "threads": args.threads,
        "timing": timing,
        "rows": rows,
        "plot_task": {"amplitude": task[1][0].item(), "phase": task[2][0].item()},
        "plot": str(png),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(table)
    print()
    print(table)
    print(json.dumps({"timing": timing, "plot": str(png)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
