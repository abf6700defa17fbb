#!/usr/bin/env python
"""Time each preset's training step and test forward with its convolution weights in PyTorch's default layout
against channels_last (NHWC), in the same process, from the same initial weights, on the same tasks.

For every preset named: the run is built as fewshot-train builds it (real data from FEWSHOT_DATA_ROOT), twice from
the same seed; one copy's 4-d weights are converted with Module.to(memory_format=torch.channels_last), as
device.channels_last=true converts them. A training step is the forward over one meta-batch of the preset's training
shape, backward and an Adam step; a test step is the forward over one test batch of the preset's test shape without
gradients (MAML-family: with its inner steps). Steps are timed in turns (bench_maml.time_interleaved), so a busy
machine slows both alike. Prints one JSON object: the median ms of each and default / channels_last (above 1:
channels_last is faster), a line per preset as it finishes and all of them in the last line; a preset that fails in
either layout is reported as {"error": ...}. Measured on the 2-core CPU (torch 2.14.1, 2 threads, 2026-11-28), train
/ test default-to-channels_last, tasks under vmap as fewshot ran them then: protonet 5w1s 1.24-1.27 / 1.03-1.06,
5w5s 1.31 / 1.03; reptile 5w1s 1.10 / 1.10; siamese 20w1s 1.13 / 0.97, 5w1s 0.92 / 1.04; matching 5w1s 0.88 / 1.06,
FCE 0.86 / 1.04; MAML 5w1s 1.02 / 1.04, first-order 1.05 / 1.04; Meta-SGD 0.98 / 1.11; Meta-LSTM 1.00 / 1.00; MAML++
0.94 / 1.10; later (2026-11-29, one thread beside a training run) ANIL 20w1s 1.14 / 1.27, 20w5s 1.13 / 1.42.
With --tasks, the metric algorithms' per-task loop (fewshot's CPU default since) against vmap: the test
step with the loop and NHWC 4.08-5.15x faster than vmap in NCHW (before both changes; protonet 20w1s 2.64x), the
training step 1.28-1.50x (matching 5w1s 1.50, FCE 1.42, siamese 5w1s 1.45, 20w1s 1.44, matching 20w5s 1.47, protonet
1.28-1.34); with the loop, NHWC against NCHW: tests 1.46-1.85x, training 0.90 (matching 5w1s) to 1.27x. Hence
Algorithm.cpu_channels_last for protonet, matching, siamese, reptile and anil.

    python scripts/bench_channels_last.py [--device cpu] [--iters 6] [--warmup 2] [--tasks] [PRESET ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from hydra import compose, initialize_config_module

from fewshot import engine
from fewshot.algorithms import functional
from fewshot.config import register_configs
from fewshot.device import device_label

_spec = importlib.util.spec_from_file_location("bench_maml", Path(__file__).with_name("bench_maml.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

PRESETS = [
    "protonet_omniglot_5w1s",
    "protonet_omniglot_5w5s",
    "matching_omniglot_5w1s",
    "matching_fce_omniglot_5w1s",
    "siamese_omniglot_5w1s",
    "siamese_omniglot_20w1s",
    "maml_omniglot_5w1s",
    "fomaml_omniglot_5w1s",
    "reptile_omniglot_5w1s",
    "meta_sgd_omniglot_5w1s",
    "meta_lstm_omniglot_5w1s",
    "maml_pp_omniglot_5w1s",
]


def build(preset: str, device: str, channels_last: Optional[bool], overrides: Sequence[str] = ()) -> engine.Run:
    """The run in the default layout, its weights then converted as device.channels_last=true converts them (which
    the config refuses on CUDA until this script has measured it there); channels_last None: in the layout
    fewshot-train picks. overrides: further config overrides."""
    with initialize_config_module(config_module="fewshot.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}", f"device={device}", "seed=1", *overrides])
    if channels_last is not None:
        cfg.device.channels_last = False
    engine.seed_everything(1)
    run = engine.build(cfg)
    if channels_last:
        run.algo.to(memory_format=torch.channels_last)
    return run


def steps(run: engine.Run, setup: Callable[[], None] = lambda: None) -> dict[str, Callable[[], float]]:
    """'train' and 'test' -> closure returning the ms of one step of run, after setup(): a training step is the
    forward over one meta-batch of the preset's training shape, backward and an Adam step; a test step the forward
    over one test batch of its test shape without gradients (MAML-family: with its inner steps)."""
    s = run.settings
    train_ep = engine.make_sampler(run, "train", seed=7).sample(s.meta_batch_size)
    test_ep = engine.make_sampler(run, "test", seed=8).sample(min(s.eval_batch, s.test_episodes))
    train_step = bench.meta_step(run.algo, train_ep, run.device, optimizer=run.optimizer(run.algo.parameters()))

    def train() -> float:
        setup()
        run.algo.train()
        return train_step()

    def test() -> float:
        setup()
        run.algo.eval()
        t = time.perf_counter()
        run.algo(test_ep, train=False)
        bench.sync(run.device)
        return (time.perf_counter() - t) * 1e3

    return {"train": train, "test": test}


def steps_for(preset: str, device: str, tasks: bool) -> dict[str, Callable[[], float]]:
    """'{train|test} {variant}' -> closure returning ms. Variants: default, channels_last; with tasks also each
    with the tasks under vmap on a CPU too (functional.CPU_STRATEGY = "vmap", what strategy "auto" and the metric
    algorithms' embed_tasks then run: fewshot's metric algorithms before the per-task loop), named '... vmap'.
    Malloc as glibc leaves it (device.keep_freed_memory=false), as the figures above were measured."""
    variants = [("default", False, "loop"), ("channels_last", True, "loop")]
    if tasks:
        variants += [("default vmap", False, "vmap"), ("channels_last vmap", True, "vmap")]
    closures = {}
    for name, nhwc, strategy in variants:
        run = build(preset, device, nhwc, overrides=["device.keep_freed_memory=false"])
        for part, step in steps(
            run, setup=lambda strategy=strategy: setattr(functional, "CPU_STRATEGY", strategy)
        ).items():
            closures[f"{part} {name}"] = step
    return closures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("presets", nargs="*", default=PRESETS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tasks", action="store_true", help="also time vmap over the tasks (the per-task loop's baseline)")
    args = p.parse_args()
    if args.tasks and args.device != "cpu":
        p.error("--tasks compares the per-task loop with vmap, which only a CPU runs both of (CUDA always vmaps)")
    register_configs()
    device = torch.device(args.device)
    out: dict = {"device": device_label(device), "threads": torch.get_num_threads(), "torch": torch.__version__}
    for preset in args.presets:
        try:
            res = bench.time_interleaved(steps_for(preset, args.device, args.tasks), device, args.iters, args.warmup)
        except Exception as e:  # e.g. a layout an op refuses under vmap on CUDA: say so, time the next preset
            row = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}
        else:
            row = {k: round(v["ms_median"], 1) for k, v in res.items()}
            for part in ("train", "test"):
                names = [k.split(" ", 1)[1] for k in res if k.startswith(part)]
                for base in ["default", "default vmap"] if args.tasks else ["default"]:
                    for other in names:
                        if other != base:
                            row[f"{part} {base}/{other}"] = round(row[f"{part} {base}"] / row[f"{part} {other}"], 2)
        out[preset] = row
        print(json.dumps({preset: row}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
