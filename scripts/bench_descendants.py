#!/usr/bin/env python
"""Time one meta-iteration of MAML's descendants against a baseline in the same process, on the same random tasks.

- Meta-SGD (fewshot.algorithms.meta_sgd) against learn2learn's MetaSGD clone/adapt loop, at the
  meta_sgd_omniglot_5w1s preset's shape (Conv4 64, 32 tasks of 5-way 1-shot, 1 query per class, 1 step, second
  order); with --graph (default on CUDA) also fewshot's captured step (trainer.cuda_graph=on).
- MAML++ (fewshot.algorithms.maml_pp) at the maml_pp_omniglot_5w1s preset's shape (Conv4 64 with max-pool and leaky
  ReLU, 8 tasks, 1 query per class, 5 steps, the multi-step loss on), its loop and vmap strategies, beside fewshot's
  MAML with 5 steps on the same net and tasks (MAML++'s extra work: per-step BatchNorm rows, step sizes, MSL's query
  passes); with --graph also MAML++'s captured step. "_after_msl": the same step after MSL's epochs (the presets'
  last 90%), the final step's query pass alone, which the captured step also becomes since it is captured again
  when MSL ends. There is no learn2learn MAML++ to compare with.
- ANIL (fewshot.algorithms.anil) at the anil_omniglot_20w1s preset's shape (Conv4 64, 16 tasks of 20-way 1-shot, 1
  query per class, 5 steps, second order) against learn2learn's MAML around the head, as its ANIL example runs it,
  task by task (the body's support and query passes taken apart, as ANIL's), beside fewshot's MAML with the same
  steps, net and tasks (what adapting the head alone saves); with --graph also ANIL's captured step.

A meta-iteration is the forward over the meta-batch, loss.backward() and an Adam step (synchronised on CUDA); the
closures are timed in turns (bench_maml.time_interleaved). Prints one JSON object per setting with the median ms of
each and the ratios to the baseline.

    python scripts/bench_descendants.py --device cpu [--iters 3] [--warmup 1] [--settings anil_omniglot_20w1s]
    python scripts/bench_descendants.py --device cuda
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fewshot.algorithms.anil import ANIL
from fewshot.algorithms.base import AlgoOutput, Algorithm
from fewshot.algorithms.maml import MAML
from fewshot.algorithms.maml_pp import MAMLPlusPlus
from fewshot.algorithms.meta_sgd import MetaSGD
from fewshot.data.base import Episode
from fewshot.models.backbones import Conv4

# bench_maml's episode, step and timing helpers: one home for how fewshot times a meta-iteration.
_spec = importlib.util.spec_from_file_location("bench_maml", Path(__file__).with_name("bench_maml.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


class MetaSGDL2L(Algorithm):
    """learn2learn's MetaSGD around a MetaSGD's net and step sizes (the same weights): the trusted baseline."""

    def __init__(self, ours: MetaSGD) -> None:
        import learn2learn as l2l

        super().__init__()
        self.meta = l2l.algorithms.MetaSGD(ours.net, lr=0.0)
        for theirs, mine in zip(self.meta.lrs, ours.lrs):
            theirs.data.copy_(mine.data)

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        losses = []
        for sx, sy, qx, qy in zip(episode.support_x, episode.support_y, episode.query_x, episode.query_y):
            learner = self.meta.clone()
            learner.adapt(F.cross_entropy(learner(sx), sy))
            losses.append(F.cross_entropy(learner(qx), qy))
        return AlgoOutput(loss=torch.stack(losses).mean(), score=torch.zeros(len(losses)))


class ANILL2L(Algorithm):
    """learn2learn's MAML around an ANIL's head, the body run outside it (its ANIL example's update, with the support
    and query passes apart as ANIL's; the example passes a whole task at once): the trusted baseline, on ANIL's own
    body and head (the same weights). tests/test_anil.py checks ANIL's meta-gradients against it."""

    def __init__(self, ours: ANIL) -> None:
        import learn2learn as l2l

        super().__init__()
        self.body, self.steps = ours.body, ours.inner_steps
        self.head = l2l.algorithms.MAML(ours.head, lr=ours.inner_lr, first_order=ours.first_order)

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        losses = []
        for sx, sy, qx, qy in zip(episode.support_x, episode.support_y, episode.query_x, episode.query_y):
            learner, support = self.head.clone(), self.body(sx)
            for _ in range(self.steps):
                learner.adapt(F.cross_entropy(learner(support), sy))
            losses.append(F.cross_entropy(learner(self.body(qx)), qy))
        return AlgoOutput(loss=torch.stack(losses).mean(), score=torch.zeros(len(losses)))


def _copy(algo: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(algo)


def meta_sgd_setting(device: torch.device, args) -> dict:
    torch.manual_seed(0)
    net = functools.partial(Conv4, in_channels=1, image_size=28)
    ours = MetaSGD(net, 5).to(device)
    episode = bench.random_episode(5, 1, 1, 32, device, seed=1)
    steps = {
        "ours": bench.meta_step(ours, episode, device, args.block),
        "l2l": bench.meta_step(MetaSGDL2L(_copy(ours)).to(device), episode, device),
    }
    if args.graph:
        steps["graph"] = bench.graph_step(_copy(ours), episode, device, args.block)
    return steps


def maml_pp_setting(device: torch.device, args) -> dict:
    torch.manual_seed(0)
    net = functools.partial(Conv4, in_channels=1, image_size=28, max_pool=True, leaky_slope=0.01)
    episode = bench.random_episode(5, 1, 1, 8, device, seed=1)
    steps = {}
    for msl, suffix in ((10, ""), (0, "_after_msl")):
        for strategy in ("loop", "vmap"):
            algo = MAMLPlusPlus(net, 5, inner_steps=5, msl_epochs=msl, strategy=strategy).to(device)
            steps[f"maml_pp_{strategy}{suffix}"] = bench.meta_step(algo, episode, device, args.block)
        if args.graph:
            algo = MAMLPlusPlus(net, 5, msl_epochs=msl).to(device)
            steps[f"maml_pp_graph{suffix}"] = bench.graph_step(algo, episode, device, args.block)
    steps["maml_5_steps"] = bench.meta_step(MAML(net, 5, inner_lr=0.1, inner_steps=5).to(device), episode, device)
    return steps


def anil_setting(device: torch.device, args) -> dict:
    torch.manual_seed(0)
    net = functools.partial(Conv4, in_channels=1, image_size=28)
    ours = ANIL(net, 20, inner_lr=0.1, inner_steps=5).to(device)
    episode = bench.random_episode(20, 1, 1, 16, device, seed=1)
    steps = {
        "ours": bench.meta_step(ours, episode, device, args.block),
        "l2l": bench.meta_step(ANILL2L(_copy(ours)).to(device), episode, device),
        "maml_5_steps": bench.meta_step(MAML(net, 20, inner_lr=0.1, inner_steps=5).to(device), episode, device),
    }
    if args.graph:
        steps["graph"] = bench.graph_step(_copy(ours), episode, device, args.block)
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=None, help="timed turns (default 10 on CUDA, 3 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per closure (default 5 on CUDA, 1)")
    p.add_argument("--block", type=int, default=None, help="meta-iterations per measurement (default 10 on CUDA, 1)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    settings = {
        "meta_sgd_omniglot_5w1s": (meta_sgd_setting, "l2l"),
        "maml_pp_omniglot_5w1s": (maml_pp_setting, "maml_5_steps"),
        "anil_omniglot_20w1s": (anil_setting, "l2l"),
    }
    p.add_argument("--settings", default=",".join(settings), help="comma-separated, of: " + ", ".join(settings))
    args = p.parse_args()
    unknown = set(args.settings.split(",")) - set(settings)
    if unknown:
        p.error(f"unknown setting(s) {', '.join(sorted(unknown))}; choose from {', '.join(settings)}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.iters = args.iters or (10 if cuda else 3)
    args.warmup = args.warmup or (5 if cuda else 1)
    args.block = args.block or (10 if cuda else 1)
    args.graph = cuda if args.graph is None else args.graph
    for name in args.settings.split(","):
        make, baseline = settings[name]
        timed = bench.time_interleaved(make(device, args), device, args.iters, args.warmup)
        base = timed[baseline]["ms_median"]
        ratios = {k: round(base / v["ms_median"], 2) for k, v in timed.items() if "ms_median" in v and k != baseline}
        device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(json.dumps({"setting": name, "device": device_name, "torch": torch.__version__, "threads":
                          torch.get_num_threads(), **timed, f"speedup_vs_{baseline}": ratios}))  # fmt: skip


if __name__ == "__main__":
    main()
