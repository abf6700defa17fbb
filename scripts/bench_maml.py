#!/usr/bin/env python
"""Time one MAML meta-iteration: this project's functional MAML against learn2learn's clone/adapt loop.

Both run in this process on the same random tasks and the same initial weights; a meta-iteration is the
forward over the meta-batch, loss.backward() and an Adam step (with cuda synchronize on CUDA). Settings are
the MAML paper's Omniglot ones, second order, Conv4 (64 filters, 28x28, 15 queries per class):
5-way 1-shot (32 tasks, 1 inner step, inner_lr 0.4) and 20-way 1-shot (16 tasks, 5 inner steps, inner_lr 0.1).

With --graph (the default on CUDA) it also times fewshot's training step with trainer.cuda_graph=on
(fewshot.engine.steps.GraphStep: the same MAML step on static tensors, captured once as a CUDA graph and replayed;
its sampler copies the same tasks into the static inputs each iteration). Ours and the graph are timed over
--block meta-iterations per measurement (default 10 on CUDA), as the training loop runs them without a host
synchronisation in between; learn2learn one at a time (it is host-bound).

--queries overrides the 15 query images per class (MAML's own code, and fewshot's presets, draw 1 = shots).
--variants also times the graph step of other versions of the same vmap step, each on its own copy of the
weights. The graph step runs VmapForms' defaults (bn_function, grouped_query and batched_split below, together);
each variant starts from "plain" (vmap's own batching of every pass, the default until the H200 bench of
2026-11-26) and changes one thing: "before" (BatchNorm as the six-pass textbook decomposition in every pass,
fewshot's step until the fused form), "bf16_query" (the query pass under bf16 autocast; the support passes, inner
gradients and losses in fp32), "batched_matmul" and "batched_split" (VmapForms.batched_conv: the convolutions with
per-task weights that are differentiated twice as unfold + batched matmul, or with the input gradient as a
transposed convolution, past torch's grouped-convolution double backward, which runs one convolution per task),
"batched_fprop" (every input gradient of those convolutions, at every order, as a forward convolution: cuDNN runs a
grouped dgrad as one kernel per task; fewshot.algorithms.conv_forms),
"bn_function" (VmapForms.support_batch_norm: the support passes' BatchNorm with its backward written out, which
keeps less for the double backward), "grouped_query" (VmapForms.grouped_query: the query pass outside vmap as one
network grouped by task, which keeps what a per-task pass keeps), "lean" (bn_function and grouped_query); and,
starting from the default instead, "default" (the default forms, under vmap also on a CPU, where the graph step
of the auto strategy runs the per-task loop),
"lean_fprop" (the default with batched_fprop in place of batched_split, the grouped query pass's convolutions too),
"lean_split_first" (the default with the first inner step's convolutions in the split form too:
VmapForms.first_step_conv; on a CPU its 5w1s step peaks at 95.6 MiB, the default's at 108.5).
(channels_last was measured failing under vmap on an H100: "NYI: querying is_contiguous inside of vmap".)
--cudnn-benchmark sets
torch.backends.cudnn.benchmark for the whole process (cuDNN caches the algorithm it first picks per shape, so a
process cannot time both; run it twice). --profile prints the CUDA kernels of one eager and one graphed iteration
of each (count, summed kernel time, the costliest kernels).
On CUDA a graph's memory is given two ways: "step_mem_mib_graph" is its private pool (reserved in whole allocator
segments, held between replays) plus what a replay allocates, and "graph_peak_alloc_mib" the most its tensors took at
once while it was captured: the allocator's peak, what "step_mem_mib_l2l" measures of learn2learn's eager step
(None where the capture failed). The capture resets the allocator's peak: keep --warmup · --block above the graph
step's own warm-up (steps.WARMUP), so that no capture falls in a timed call.
--memory (CPU) prints the memory each closure allocates at its peak within one meta-iteration, from the
profiler's allocation events: what the autograd graph keeps, as on a GPU minus cuDNN's workspaces (on CUDA every
record carries the allocator's step memory anyway). --ops (CPU) counts the operations each closure's step dispatches
(views left out) and the convolutions among them: a replayed graph's kernels, roughly. On a CPU the variants run
the same static-buffer step eagerly.

Prints one JSON object per setting (and, with --all-strategies, per strategy of ours), then a summary line
{"summary": ..., "speedup": {setting: l2l ms / ours ms}, "graph_speedup": {setting: l2l ms / graph ms}} for the
strategy that "auto" picks.

    python scripts/bench_maml.py --device cpu [--iters 3] [--warmup 1] [--all-strategies]
    python scripts/bench_maml.py --device cuda            # eager vs graph vs learn2learn
    python scripts/bench_maml.py --device cuda --queries 1 --variants --profile
    python scripts/bench_maml.py --device cpu --graph --variants --memory --ops --all-strategies \
        --settings omniglot_20w1s --queries 1 --iters 1 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import platform
import statistics
import time
from typing import Callable

import torch

from fewshot.algorithms import functional, vmap_forms
from fewshot.algorithms.functional import _StatelessCall
from fewshot.algorithms.maml import MAML, resolve_strategy
from fewshot.algorithms.maml_l2l import MAMLL2L
from fewshot.algorithms.vmap_forms import PLAIN, VmapForms
from fewshot.data.base import Episode
from fewshot.engine.loop import Progress
from fewshot.engine.steps import GraphStep
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


def meta_step(
    algo: torch.nn.Module,
    episode: Episode,
    device: torch.device,
    block: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
) -> Callable[[], float]:
    """A closure running `block` meta-iterations (forward, backward, optimizer step: Adam at 1e-3 unless given)
    and returning ms per iteration."""
    optimizer = optimizer or torch.optim.Adam(algo.parameters(), lr=1e-3)

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(block):
            optimizer.zero_grad(set_to_none=True)
            out = algo(episode, train=True)
            out.loss.backward()
            optimizer.step()
        sync(device)
        return (time.perf_counter() - start) * 1e3 / block

    return step


class FixedTasks:
    """A sampler that gives the same tasks every time, copied into the graph's static inputs."""

    def __init__(self, episode: Episode) -> None:
        self.episode = episode

    def sample(self, tasks: int, out: Episode | None = None) -> Episode:
        if out is None:
            return Episode(*(t.clone() for t in self.episode.tensors()), ways=self.episode.ways)
        return out.copy_(self.episode)


def graph_step(algo: torch.nn.Module, episode: Episode, device: torch.device, block: int) -> Callable[[], float]:
    """fewshot's trainer.cuda_graph=on step (Adam 1e-3, capturable), `block` iterations per measurement."""
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-3)
    mode = torch.backends.cudnn.benchmark
    stepper = GraphStep(algo, FixedTasks(episode), optimizer, None, episode.tasks, None, Progress(), "bench")
    torch.backends.cudnn.benchmark = mode  # GraphStep turns it on; here the process's --cudnn-benchmark rules
    calls = 0

    def step() -> float:
        nonlocal calls
        sync(device)
        start = time.perf_counter()
        for _ in range(block):
            calls += 1
            stepper(calls)
        sync(device)
        return (time.perf_counter() - start) * 1e3 / block

    step.stepper = stepper  # type: ignore[attr-defined]
    return step


def _textbook_batch_norm(bn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm from batch statistics as fewshot decomposed it before: (x - mean) / std * weight + bias."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


class _Bf16Query(_StatelessCall):
    """A stateless call that runs the passes with native BatchNorm (the query pass) under bf16 autocast."""

    def __call__(self, weights, x):
        if self.batch_norms:  # a support pass (decomposed BatchNorm): fp32, as the inner gradients
            return super().__call__(weights, x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return super().__call__(weights, x).float()


@contextlib.contextmanager
def _patched(obj, name: str, value):
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, before)


def variant_context(name: str, algo: MAML):
    """The context every call of variant `name`'s closure runs in (it matters while the graph is traced)."""
    if name == "before":
        algo.forms.native_query_batch_norm = False
        return _patched(functional, "_batch_norm_from_batch", _textbook_batch_norm)
    if name == "bf16_query":  # every call the forms make (the query's included) is a _Bf16Query
        return _patched(vmap_forms, "_StatelessCall", _Bf16Query)
    return contextlib.nullcontext()


# Each variant's fewshot.algorithms.vmap_forms.VmapForms, set on its own copy of the algorithm ("graph": the default).
DEFAULT = dataclasses.asdict(VmapForms())
FORMS = {
    "plain": PLAIN,  # the default until the H200 bench of 2026-11-26
    "before": PLAIN,  # and BatchNorm as it ran before the query pass got the fused kernel
    "bf16_query": PLAIN,  # and the query pass under bf16 autocast
    "batched_matmul": {**PLAIN, "batched_conv": "matmul"},
    "batched_split": {**PLAIN, "batched_conv": "split"},
    "batched_fprop": {**PLAIN, "batched_conv": "fprop"},
    "bn_function": {**PLAIN, "support_batch_norm": "function"},
    "grouped_query": {**PLAIN, "grouped_query": True},
    "lean": {**PLAIN, "support_batch_norm": "function", "grouped_query": True},
    "lean_fprop": {**PLAIN, "support_batch_norm": "function", "grouped_query": True, "batched_conv": "fprop"},
    "default": DEFAULT,  # "graph" by the vmap strategy: on a CPU auto picks the loop
    "lean_split_first": {**DEFAULT, "first_step_conv": "split"},
}
VARIANTS = tuple(FORMS)


def variant_step(name: str, algo: MAML, episode: Episode, device: torch.device, block: int) -> Callable[[], float]:
    """The graph step of variant `name` ("graph": fewshot's own)."""
    for knob, value in FORMS.get(name, {}).items():
        setattr(algo.forms, knob, value)
    inner = graph_step(algo, episode, device, block)
    if name == "graph":
        return inner

    def step() -> float:
        with variant_context(name, algo):
            return inner()

    step.stepper = inner.stepper  # type: ignore[attr-defined]
    return step


def profile_kernels(fn: Callable[[], float], device: torch.device, iterations: int) -> dict:
    """CUDA kernels that `fn` (running `iterations` meta-iterations) launches: per iteration, the count, the
    summed kernel time, and the ten costliest kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = fn()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:10]
    return {
        "kernels_per_iter": round(len(kernels) / iterations, 1),
        "kernel_ms_per_iter": round(sum(sum(v) for v in by_name.values()) / 1e3 / iterations, 3),
        "wall_ms_per_iter": round(wall, 3),
        "top": [
            {
                "kernel": k,
                "calls_per_iter": round(len(v) / iterations, 1),
                "ms_per_iter": round(sum(v) / 1e3 / iterations, 3),
            }
            for k, v in top
        ],  # fmt: skip
    }


def cpu_step_memory(fn: Callable[[], float]) -> float:
    """MiB that one call of `fn` allocates at its peak beyond what was allocated before it (CPU tensors), from the
    profiler's allocation events in time order."""
    import json as json_module
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json_module.load(f)["traceEvents"]
    finally:
        os.remove(path)
    allocations = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    current = peak = 0
    for e in allocations:
        current += e["args"]["Bytes"]
        peak = max(peak, current)
    return peak / 2**20


def cpu_step_ops(fn: Callable[[], float]) -> dict:
    """The ATen operations one call of `fn` dispatches, views left out (they launch no kernel): in all, and the
    convolutions among them. On a GPU each is one kernel or more (a cuDNN convolution often two), which is what a
    replayed graph is made of."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"ops": 0, "convolutions": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not any(r.alias_info is not None for r in func._schema.returns):
                counts["ops"] += 1
                counts["convolutions"] += func.overloadpacket.__name__.startswith("convolution")
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return counts


def time_interleaved(
    steps: dict[str, Callable[[], float]], device: torch.device, iters: int, warmup: int
) -> dict[str, dict]:
    """Median ms per meta-iteration of each closure, timed in turns (A B C, B C A, ...) so that a busy
    machine slows all of them alike. On CUDA also the memory a closure's iterations allocate at their peak beyond
    what was allocated before them (the weights, optimizer states and inputs of every closure stay resident in
    between, so an absolute peak would charge each closure with all the others'). A variant (a closure whose name is
    in VARIANTS) that raises in its warm-up is left out and reported as {"error": ...}."""
    failed = {}
    for name, step in list(steps.items()):
        try:
            for _ in range(warmup):
                step()
        except Exception as e:
            if name not in VARIANTS:
                raise
            failed[name] = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"}
            del steps[name]
            sync(device)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, float] = {name: 0.0 for name in names}
    for i in range(iters):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if device.type == "cuda":
                sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(steps[name]())
            if device.type == "cuda":
                peaks[name] = max(peaks[name], (torch.cuda.max_memory_allocated(device) - base) / 2**20)
    return failed | {
        name: {"ms_median": statistics.median(t), "ms_all": [round(x, 1) for x in t], "step_mem_mib": peaks[name]}
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
    parser.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None, help="time the CUDA graph")
    parser.add_argument("--block", type=int, default=None, help="iterations per measurement (ours, graph)")
    parser.add_argument("--queries", type=int, default=None, help="query images per class (default 15)")
    parser.add_argument(
        "--variants",
        nargs="*",
        metavar="NAME",
        help=f"also time other versions of the graph step: those named, or with no name all of {', '.join(VARIANTS)}",
    )
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--profile", action="store_true", help="print the CUDA kernels of eager and graph steps")
    parser.add_argument("--memory", action="store_true", help="on a CPU: each step's peak allocation (profiler)")
    parser.add_argument("--ops", action="store_true", help="on a CPU: the operations each step dispatches")
    args = parser.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    graph = args.graph if args.graph is not None else not cpu
    block = args.block or (1 if cpu else 10)
    iters = args.iters if args.iters is not None else (3 if cpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    )
    auto = resolve_strategy("auto", device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    unknown = sorted(set(args.variants or ()) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: no variant {', '.join(unknown)}; there are {', '.join(VARIANTS)}")
    variants = (args.variants or list(VARIANTS)) if args.variants is not None and graph else []
    memory = device.type == "cuda" or args.memory  # step memory: the allocator's on CUDA, the profiler's on a CPU
    strategies = [auto] + ([s for s in ("loop", "vmap") if s != auto] if args.all_strategies else [])

    speedups, graph_speedups = {}, {}
    for name in args.settings:
        s = dict(SETTINGS[name], **({"queries": args.queries} if args.queries else {}))
        backbone = functools.partial(Conv4, in_channels=1, image_size=28, hidden=args.hidden)
        episode = random_episode(s["ways"], s["shots"], s["queries"], s["tasks"], device, seed=0)
        common = dict(ways=s["ways"], inner_lr=s["inner_lr"], inner_steps=s["inner_steps"], first_order=False)
        torch.manual_seed(0)
        algos: dict[str, torch.nn.Module] = {"l2l": MAMLL2L(backbone, **common).to(device)}
        for strategy in strategies:
            algos[strategy] = MAML(backbone, strategy=strategy, **common).to(device)
            algos[strategy].load_state_dict(algos["l2l"].state_dict())  # the same initial weights
        closures = {k: meta_step(a, episode, device, 1 if k == "l2l" else block) for k, a in algos.items()}
        for v in ["graph", *variants] if graph else []:  # each on its own copy of the same initial weights
            algos[v] = MAML(backbone, strategy=auto if v == "graph" else "vmap", **common).to(device)
            algos[v].load_state_dict(algos["l2l"].state_dict())
            closures[v] = variant_step(v, algos[v], episode, device, block)
        timings = time_interleaved(closures, device, iters, warmup)
        for k in timings if cpu and (args.memory or args.ops) else []:
            if "error" in timings[k]:
                continue
            # the profiler and dispatch modes see this thread only, not the threaded loop's workers: no figures
            threaded = isinstance(algos[k], MAML) and resolve_strategy(algos[k].strategy, device) == "loop"
            if args.memory:
                timings[k]["step_mem_mib"] = None if threaded else cpu_step_memory(closures[k])
            if args.ops and not threaded:
                timings[k]["ops"] = cpu_step_ops(closures[k])
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
            if args.ops and cpu:
                record["ops_per_iter"] = {k: t["ops"] for k, t in timings.items() if "ops" in t}
            if memory:
                record["step_mem_mib_ours"] = ours["step_mem_mib"] and round(ours["step_mem_mib"], 1)
                record["step_mem_mib_l2l"] = round(l2l["step_mem_mib"], 1)
            if graph and strategy == auto:
                g = timings["graph"]
                record["ms_per_iter_graph"] = round(g["ms_median"], 2)
                record["graph_speedup"] = round(l2l["ms_median"] / g["ms_median"], 3)
                record["graph_vs_eager"] = round(ours["ms_median"] / g["ms_median"], 3)
                record["ms_all_graph"] = g["ms_all"]

                def graph_mem(v: str) -> float | None:  # what a replay allocates (little) + the graph's private pool
                    if timings[v]["step_mem_mib"] is None:
                        return None
                    return round(timings[v]["step_mem_mib"] + closures[v].stepper.pool_bytes / 2**20, 1)

                def graph_peak(v: str) -> float | None:  # the capture's allocated peak, as learn2learn's is read
                    stepper = closures[v].stepper
                    return None if stepper.graph is None else round(stepper.peak_bytes / 2**20, 1)

                if memory:
                    record["step_mem_mib_graph"] = graph_mem("graph")
                    record["graph_pool_mib"] = round(closures["graph"].stepper.pool_bytes / 2**20, 1)
                    if not cpu:
                        record["graph_peak_alloc_mib"] = graph_peak("graph")
                graph_speedups[name] = record["graph_speedup"]
                for v in variants:
                    if "error" in timings[v]:
                        record[f"graph_{v}_error"] = timings[v]["error"]
                        continue
                    record[f"ms_per_iter_graph_{v}"] = round(timings[v]["ms_median"], 2)
                    record[f"graph_vs_{v}"] = round(timings[v]["ms_median"] / g["ms_median"], 3)
                    if memory:
                        record[f"step_mem_mib_graph_{v}"] = graph_mem(v)
                        if not cpu:
                            record[f"graph_peak_alloc_mib_{v}"] = graph_peak(v)
                if args.profile and device.type == "cuda":
                    for k in (strategy, "graph", *(v for v in variants if "error" not in timings[v])):
                        profile = profile_kernels(closures[k], device, block)
                        print(json.dumps({"setting": name, "profile": k, **profile}), flush=True)
            record["block"] = block
            record["cudnn_benchmark"] = args.cudnn_benchmark
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
                **({"graph_speedup": graph_speedups} if graph else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
