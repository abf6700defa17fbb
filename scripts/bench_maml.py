#!/usr/bin/env python
"""Time one MAML meta-iteration: this project's functional MAML against learn2learn's clone/adapt loop.

Both run in this process on the same random tasks and the same initial weights; a meta-iteration is the
forward over the meta-batch, loss.backward() and an Adam step (with cuda synchronize on CUDA). Settings are
the MAML paper's Omniglot ones, second order, Conv4 (64 filters, 28x28, 15 queries per class):
5-way 1-shot (32 tasks, 1 inner step, inner_lr 0.4) and 20-way 1-shot (16 tasks, 5 inner steps, inner_lr 0.1).

Prints one JSON object per setting (and, with --all-strategies, per strategy of ours), then a summary line
{"summary": ..., "speedup": {setting: l2l ms / ours ms}} for the strategy that "auto" picks.

    python scripts/bench_maml.py --device cpu [--iters 3] [--warmup 1] [--all-strategies]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from typing import Callable

import torch

from fewshot.algorithms.maml import MAML, resolve_strategy
from fewshot.algorithms.maml_l2l import MAMLL2L
from fewshot.data.base import Episode
from fewshot.models.backbones import Conv4

SETTINGS = {
    "omniglot_5w1s": dict(ways=5, shots=1, queries=15, tasks=32, inner_steps=1, inner_lr=0.4),
    "omniglot_20w1s": dict(ways=20, shots=1, queries=15, tasks=16, inner_steps=5, inner_lr=0.1),
}


def random_episode(ways: int, shots: int, queries: int, tasks: int, device: torch.device, seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = lambda n: torch.arange(ways).repeat_interleave(n).expand(tasks, -1).contiguous()  # noqa: E731
    return Episode(
        torch.rand(tasks, ways * shots, 1, 28, 28, generator=g),
        labels(shots),
        torch.rand(tasks, ways * queries, 1, 28, 28, generator=g),
        labels(queries),
    ).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def meta_step(algo: torch.nn.Module, episode: Episode, device: torch.device) -> Callable[[], float]:
    """A closure running one meta-iteration (forward, backward, Adam step) and returning its ms."""
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = algo(episode, train=True)
        out.loss.backward()
        optimizer.step()
        sync(device)
        return (time.perf_counter() - start) * 1e3

    return step


def time_interleaved(
    steps: dict[str, Callable[[], float]], device: torch.device, iters: int, warmup: int
) -> dict[str, dict]:
    """Median ms per meta-iteration of each closure, timed in turns (A B C, B C A, ...) so that a busy
    machine slows all of them alike; peak CUDA memory per closure when on CUDA."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, float] = {name: 0.0 for name in names}
    for i in range(iters):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(steps[name]())
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / 2**20)
    return {
        name: {"ms_median": statistics.median(t), "ms_all": [round(x, 1) for x in t], "peak_mem_mib": peaks[name]}
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--iters", type=int, default=None, help="timed meta-iterations per algorithm (default: 3 on CPU, 20 on CUDA)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed meta-iterations first (default: 1 on CPU, 5 on CUDA)"
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--all-strategies", action="store_true", help="also time the strategy auto does not pick")
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    iters = args.iters if args.iters is not None else (3 if cpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    )
    auto = resolve_strategy("auto", device)
    strategies = [auto] + ([s for s in ("loop", "vmap") if s != auto] if args.all_strategies else [])

    speedups = {}
    for name in args.settings:
        s = SETTINGS[name]
        backbone = functools.partial(Conv4, in_channels=1, image_size=28, hidden=args.hidden)
        episode = random_episode(s["ways"], s["shots"], s["queries"], s["tasks"], device, seed=0)
        common = dict(ways=s["ways"], inner_lr=s["inner_lr"], inner_steps=s["inner_steps"], first_order=False)
        torch.manual_seed(0)
        algos: dict[str, torch.nn.Module] = {"l2l": MAMLL2L(backbone, **common).to(device)}
        for strategy in strategies:
            algos[strategy] = MAML(backbone, strategy=strategy, **common).to(device)
            algos[strategy].load_state_dict(algos["l2l"].state_dict())  # the same initial weights
        timings = time_interleaved({k: meta_step(a, episode, device) for k, a in algos.items()}, device, iters, warmup)
        l2l = timings["l2l"]
        for strategy in strategies:
            ours = timings[strategy]
            speedup = l2l["ms_median"] / ours["ms_median"]
            record = {
                "setting": name,
                **s,
                "second_order": True,
                "device": device_name,
                "torch": torch.__version__,
                "strategy": strategy,
                "auto": strategy == auto,
                "iters": iters,
                "warmup": warmup,
                "ms_per_iter_ours": round(ours["ms_median"], 2),
                "ms_per_iter_l2l": round(l2l["ms_median"], 2),
                "speedup": round(speedup, 3),
                "ms_all_ours": ours["ms_all"],
                "ms_all_l2l": l2l["ms_all"],
            }
            if device.type == "cuda":
                record["peak_mem_mib_ours"] = round(ours["peak_mem_mib"], 1)
                record["peak_mem_mib_l2l"] = round(l2l["peak_mem_mib"], 1)
            print(json.dumps(record), flush=True)
            if strategy == auto:
                speedups[name] = round(speedup, 3)
    print(
        json.dumps(
            {
                "summary": "speedup = l2l ms / ours ms (median), strategy auto",
                "device": device_name,
                "strategy": auto,
                "speedup": speedups,
            }
        )
    )


if __name__ == "__main__":
    main()
