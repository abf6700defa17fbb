#!/usr/bin/env python
"""Time one Reptile meta-iteration against the reference's loop retold with torch.optim.Adam, in the same process,
on the same tasks and mini-batches.

At the reptile_omniglot_5w1s preset's shape: Conv4 64 (stride 2, flattened), 5 tasks of 5 ways x 10 images, 5
inner Adam steps (beta1 0, lr 1e-3) on mini-batches of 10, then the meta step theta + (mean phi - theta).
- ours: fewshot.algorithms.reptile.Reptile's forward, backward and the engine's SGD meta step (lr 1), its inner
  Adam written out per tensor;
- adam_loop / adam_foreach: openai/supervised-reptile's train_step as tests/test_reptile.py retells it, one
  torch.optim.Adam shared by the tasks, per tensor (foreach=False, torch's CPU default) or over all tensors at once
  (foreach=True, its CUDA default), with the weights restored by state_dict copies.
Prints one JSON object with the median ms of each and the ratios to adam_loop. On the 2-core CPU the foreach form
was no faster (its own Adam in fewshot's step: 281 against 276 ms per meta-iteration, one thread beside a
training run), so fewshot keeps the per-tensor loop there; adam_foreach against adam_loop on a GPU says whether
it would win where the step is launch-bound.

--test times the preset's test instead (50 Adam steps on the 5 support images, then the 5 queries together, for
--tasks tasks): ours, the tasks side by side under vmap, against task_loop, each task in turn through the
training's adapt() as fewshot's test ran before; ms per batch of tasks, and the ratio.

    python scripts/bench_reptile.py --device cpu [--iters 5] [--warmup 1]
    python scripts/bench_reptile.py --device cuda
    python scripts/bench_reptile.py --test [--tasks 25]
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fewshot.algorithms.reptile import Reptile, mini_batches
from fewshot.data.base import Episode
from fewshot.models.backbones import Conv4

# bench_maml's episode and timing helpers: one home for how fewshot times a meta-iteration.
_spec = importlib.util.spec_from_file_location("bench_maml", Path(__file__).with_name("bench_maml.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

WAYS, IMAGES, TASKS, STEPS, BATCH, LR = 5, 10, 5, 5, 10, 1e-3


def reference_meta_step(
    net: torch.nn.Module, episode: Episode, batches: torch.Tensor, adam: torch.optim.Adam, meta_step: float
) -> None:
    """openai/supervised-reptile's Reptile.train_step in plain PyTorch, in place (tests/test_reptile.py checks
    fewshot's Reptile against it): one Adam (beta1 0) whose state every task shares (the reference saves and restores
    only the trainable weights), a copy of the weights per task taking its steps on x[t][b] for each row b of
    batches[t], then theta + meta_step * (mean phi - theta)."""
    old = copy.deepcopy(net.state_dict())
    x = torch.cat([episode.support_x, episode.query_x], dim=1)
    y = torch.cat([episode.support_y, episode.query_y], dim=1)
    new = []
    for t in range(len(x)):
        for b in batches[t]:
            adam.zero_grad()
            F.cross_entropy(net(x[t][b]), y[t][b]).backward()
            adam.step()
        new.append(copy.deepcopy(net.state_dict()))
        net.load_state_dict(old)
    mean = {k: torch.stack([s[k] for s in new]).mean(0) for k in old}
    net.load_state_dict({k: old[k] + meta_step * (mean[k] - old[k]) for k in old})


def reference(net: torch.nn.Module, episode: Episode, device: torch.device, foreach: bool) -> Callable[[], float]:
    adam = torch.optim.Adam(net.parameters(), lr=LR, betas=(0.0, 0.999), eps=1e-8, foreach=foreach)
    batches = mini_batches(TASKS, WAYS * IMAGES, STEPS, BATCH, device)

    def step() -> float:
        bench.sync(device)
        start = time.perf_counter()
        reference_meta_step(net, episode, batches, adam, 1.0)
        bench.sync(device)
        return (time.perf_counter() - start) * 1e3

    return step


def steps(device: torch.device) -> dict[str, Callable[[], float]]:
    torch.manual_seed(0)
    backbone = functools.partial(Conv4, in_channels=1, image_size=28, flatten=True)
    algo = Reptile(backbone, WAYS, inner_lr=LR, inner_steps=STEPS, inner_batch=BATCH).to(device)
    episode = bench.random_episode(WAYS, 1, IMAGES - 1, TASKS, device, seed=1)
    return {
        "ours": bench.meta_step(algo, episode, device, optimizer=torch.optim.SGD(algo.parameters(), lr=1.0)),
        "adam_loop": reference(copy.deepcopy(algo.net), episode, device, foreach=False),
        "adam_foreach": reference(copy.deepcopy(algo.net), episode, device, foreach=True),
    }


def task_loop(algo: Reptile, episode: Episode) -> torch.Tensor:
    """The queries' logits with each task adapted in turn by adapt() from a copy of the training's Adam state."""
    tasks, n = episode.support_y.shape
    batches = mini_batches(tasks, n, algo.eval_inner_steps, algo.eval_inner_batch, episode.support_y.device)
    m, v, step = algo.adam_state()
    logits = []
    for t in range(tasks):
        state = ([a.clone() for a in m], [a.clone() for a in v], step.clone())
        weights, _, _ = algo.adapt(episode.support_x[t], episode.support_y[t], batches[t], state)
        with torch.no_grad():
            logits.append(algo._predict(weights, episode.support_x[t], episode.query_x[t]))
    return torch.stack(logits)


def test_steps(device: torch.device, tasks: int) -> dict[str, Callable[[], float]]:
    torch.manual_seed(0)
    backbone = functools.partial(Conv4, in_channels=1, image_size=28, flatten=True)
    algo = Reptile(backbone, WAYS, inner_lr=LR, eval_inner_steps=50, eval_inner_batch=5).to(device).eval()
    if device.type == "cpu":  # the layout fewshot tests Reptile in on a CPU (cpu_channels_last)
        algo.net.to(memory_format=torch.channels_last)
    episode = bench.random_episode(WAYS, 1, 1, tasks, device, seed=1)

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def step() -> float:
            bench.sync(device)
            start = time.perf_counter()
            fn()
            bench.sync(device)
            return (time.perf_counter() - start) * 1e3

        return step

    return {
        "ours": timed(lambda: algo(episode, train=False)),
        "task_loop": timed(lambda: task_loop(algo, episode)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--iters", type=int, default=None, help="timed turns (default 20 on CUDA, 5 on a CPU; --test: 10, 3)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed calls per closure (default 5 on CUDA, 1; --test: 1)"
    )
    p.add_argument("--test", action="store_true", help="time the preset's test step (vmapped) against the task loop")
    p.add_argument("--tasks", type=int, default=25, help="--test: tasks per batch (eval.meta_batch_size's default)")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    if args.test:
        timed = bench.time_interleaved(
            test_steps(device, args.tasks), device, args.iters or (10 if cuda else 3), args.warmup or 1
        )
        ratio = round(timed["task_loop"]["ms_median"] / timed["ours"]["ms_median"], 2)
        print(json.dumps({"setting": "reptile_omniglot_5w1s test", "tasks": args.tasks, "device": name,
                          "torch": torch.__version__, "threads": torch.get_num_threads(), **timed,
                          "speedup_vs_task_loop": ratio}))  # fmt: skip
        return
    timed = bench.time_interleaved(
        steps(device), device, args.iters or (20 if cuda else 5), args.warmup or (5 if cuda else 1)
    )
    base = timed["adam_loop"]["ms_median"]
    ratios = {k: round(base / v["ms_median"], 2) for k, v in timed.items() if k != "adam_loop"}
    print(json.dumps({"setting": "reptile_omniglot_5w1s", "device": name, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), **timed, "speedup_vs_adam_loop": ratios}))  # fmt: skip


if __name__ == "__main__":
    main()
