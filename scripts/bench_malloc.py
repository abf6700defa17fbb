#!/usr/bin/env python
"""Time each preset's training and test step with glibc's malloc as it is against device.keep_freed_memory (freed
memory kept in the process for the next step), in the same process, on the same run and tasks. CPU under glibc only.

glibc serves each block over its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it when freed, so the
next step faults every page in again and the kernel zeroes it. The two arms set glibc's malloc by mallopt before
each timed step: "glibc" near where glibc settles by itself once large blocks have been freed (its threshold rises to
the largest freed mapped block, at most 32 MB; the arm fixes it at 32 MB, trimming at 64 MB, as glibc pairs them),
"kept" as fewshot.device.keep_freed_memory sets it (no mmap, no trimming). Each timed step follows an untimed one in
the same arm, so that it does not pay for the other arm's heap; the arms are timed in turns
(bench_maml.time_interleaved). A block the "kept" arm leaves free in the heap can serve the "glibc" arm's next
request too (glibc looks in its bins before it maps). So before any mallopt call the first preset's training step is
timed untouched as well ("train untouched", and untouched / kept): where an arm's page faults match the untouched
step's, that arm is what a run without the setting gets; a later preset's "glibc" arm has only its own faults to show
it. Prints one JSON object: per preset the median ms and minor page faults per step of each, and glibc / kept (above
1: keeping is faster), a line per preset as it finishes and all of them in the last line, with the process's peak
resident memory. --whole-run N also trains the first preset N iterations in two processes of their own, malloc as
glibc leaves it and kept, and prints each one's training seconds and peak resident memory: a user's view, not a
same-process ratio. On the 2-core CPU (torch 2.14.1, 2 threads, 2026-11-28), glibc / kept: training steps of
protonet_omniglot_5w1s (60-way, 136,686 faults against 0; untouched 127,866 and 316.7 ms against glibc's 310.2)
1.53, matching 20w5s 1.52, its test 1.24, the Meta-LSTM's test 1.07; matching 5w1s, siamese 20w1s, MAML, Reptile
and the Meta-LSTM's training step, without faults in either arm, 0.99-1.05. Hence device.keep_freed_memory's
default. Again with --whole-run 150: glibc / kept 1.54, untouched / kept 1.52; protonet_omniglot_5w1s trained in
46.0 s against 27.7 s and peaked at 1,326 MiB resident against 1,569.

    python scripts/bench_malloc.py [--iters 6] [--warmup 1] [--whole-run N] [PRESET ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from fewshot.config import register_configs
from fewshot.device import _M_MMAP_MAX, _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _glibc, device_label, keep_freed_memory

_spec = importlib.util.spec_from_file_location("layouts", Path(__file__).with_name("bench_channels_last.py"))
layouts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layouts)
bench = layouts.bench  # bench_maml, as bench_channels_last loaded it

PRESETS = [
    "protonet_omniglot_5w1s",
    "matching_omniglot_5w1s",
    "matching_omniglot_20w5s",
    "siamese_omniglot_20w1s",
    "maml_omniglot_5w1s",
    "reptile_omniglot_5w1s",
    "meta_lstm_omniglot_5w1s",
]
CPU = torch.device("cpu")


def set_malloc(kept: bool) -> None:
    if kept:
        keep_freed_memory(True, CPU)
        return
    libc = _glibc()
    libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's default
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # where glibc's dynamic threshold ends after large frees
    libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)  # twice that, as glibc sets it


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def arms(steps: dict[str, Callable[[], float]]) -> tuple[dict[str, Callable[[], float]], dict[str, list[int]]]:
    """'{train|test} {glibc|kept}' -> closure that sets the arm's malloc, runs an untimed step and returns the ms
    of the next; and the minor page faults of each timed step, filled as the closures run."""
    closures, counts = {}, {}
    for part, step in steps.items():
        for kept in (False, True):
            name = f"{part} {'kept' if kept else 'glibc'}"
            counts[name] = []

            def timed(step=step, kept=kept, name=name) -> float:
                set_malloc(kept)
                step()
                before = faults()
                ms = step()
                counts[name].append(faults() - before)
                return ms

            closures[name] = timed
    return closures, counts


def untouched(step: Callable[[], float], iters: int, warmup: int) -> dict:
    """A training step with malloc as the process started (before this script's first mallopt)."""
    for _ in range(warmup):
        step()
    times, counts = [], []
    for _ in range(iters):
        before = faults()
        times.append(step())
        counts.append(faults() - before)
    return {"train untouched": round(statistics.median(times), 1), "faults train untouched": statistics.median(counts)}


def whole_run(preset: str, iterations: int) -> dict:
    """fewshot-train of preset for `iterations` iterations in a process of its own with device.keep_freed_memory
    false, then null: training seconds (results.json) and peak resident memory of each."""
    out = {}
    for setting in ("false", "null"):
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, "-m", "fewshot.train", f"experiment={preset}", "seed=1", "device=cpu"]
            command += [f"device.keep_freed_memory={setting}", f"trainer.iterations={iterations}"]
            command += [f"trainer.val_every={iterations + 1}", "eval.episodes=100", f"hydra.run.dir={folder}"]
            with open(Path(folder) / "stderr.log", "w+") as log:
                child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
                _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest child's
                child.returncode = os.waitstatus_to_exitcode(status)
                if child.returncode:
                    log.seek(0)
                    sys.exit(f"{' '.join(command)} failed:\n{log.read()[-2000:]}")
            results = json.loads((Path(folder) / "results.json").read_text())
        arm = "kept" if setting == "null" else "glibc"
        out[f"whole run train s {arm}"] = results["train_seconds"]
        out[f"whole run peak rss mib {arm}"] = round(usage.ru_maxrss / 1024)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("presets", nargs="*", default=PRESETS)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--whole-run", type=int, default=0, metavar="N", help="also train the first preset N iterations")
    args = p.parse_args()
    if _glibc() is None:
        p.error("this compares glibc's malloc settings, and this system's C library is not glibc")
    register_configs()
    out: dict = {"device": device_label(CPU), "threads": torch.get_num_threads(), "torch": torch.__version__}
    for i, preset in enumerate(args.presets):
        steps = layouts.steps(layouts.build(preset, "cpu", None, overrides=["device.keep_freed_memory=false"]))
        first = untouched(steps["train"], args.iters, args.warmup) if i == 0 else None
        closures, counts = arms(steps)
        res = bench.time_interleaved(closures, CPU, args.iters, args.warmup)
        row = {k: round(v["ms_median"], 1) for k, v in res.items()}
        row |= {f"faults {k}": statistics.median(v[-args.iters :]) for k, v in counts.items()}
        for part in ("train", "test"):
            row[f"{part} glibc/kept"] = round(row[f"{part} glibc"] / row[f"{part} kept"], 2)
        if first:
            row |= first | {"train untouched/kept": round(first["train untouched"] / row["train kept"], 2)}
        out[preset] = row
        print(json.dumps({preset: row}), flush=True)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.whole_run:
        out[args.presets[0]] |= whole_run(args.presets[0], args.whole_run)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
