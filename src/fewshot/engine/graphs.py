"""CUDA graph capture, shared by the training step (fewshot.engine.steps.GraphStep) and evaluation (EvalGraphs).

Capture records a function's kernels once; a replay relaunches them all in one call, reading and writing the same
tensors. Inputs are therefore drawn into static tensors (`sampler.sample(n, out=static)`), weights are updated in
place, and outputs are read (or copied) before the next replay overwrites them.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, TypeVar

import torch

from fewshot.algorithms.base import AlgoOutput, Algorithm
from fewshot.data.base import Episode

T = TypeVar("T")


def static_shapes() -> None:
    """What graph capture implies for cuDNN: every shape is fixed, so its benchmark mode times the algorithms once
    per shape (in the eager warm-up before a capture) and keeps the fastest."""
    torch.backends.cudnn.benchmark = True


def on_side_stream(fn: Callable[[], T], device: torch.device) -> T:
    """fn() on a fresh side stream, ordered after and before the current stream's work: warm-up before a capture
    runs there, as torch.cuda.graphs asks."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        result = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return result


def capture(fn: Callable[[], T], device: torch.device) -> tuple[torch.cuda.CUDAGraph, T, int, int]:
    """fn's kernels captured as one CUDA graph (not run): the graph, fn's outputs (overwritten by every replay), the
    bytes of the graph's private memory pool (its intermediate tensors, kept between replays; reserved in whole
    allocator segments) and the most bytes its tensors took at once (allocated, as an eager step's peak is read)."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # as torch.cuda.graph does on entry: measured from here, the growth is the graph's pool
    reserved = torch.cuda.memory_reserved(device)
    allocated = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.cuda.graph(graph):
        outputs = fn()
    peak = torch.cuda.max_memory_allocated(device) - allocated
    return graph, outputs, torch.cuda.memory_reserved(device) - reserved, peak


def try_capture(
    fn: Callable[[], T], device: torch.device, setting: str
) -> Optional[tuple[torch.cuda.CUDAGraph, T, int, int]]:
    """capture(fn), or None when an op cannot be captured (a host sync): then one line says so, and the caller goes
    on eagerly."""
    try:
        return capture(fn, device)
    except Exception as e:
        torch.cuda.synchronize(device)
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"fewshot: {setting}: capture failed ({type(e).__name__}: {first}); running eagerly", file=sys.stderr)
        return None


class EvalGraphs:
    """Validation and test meta-batches (eval.cuda_graph): per batch shape, the first batch runs eagerly (the
    warm-up) and is captured; later batches of that shape are drawn into its static tensors and replayed, with the
    weights read in place, so one capture serves every validation of a run. A ragged last batch is a shape of its
    own. capture=False, or a device other than CUDA: the same static-tensor code, eagerly (what the CPU tests
    compare with the plain loop). A capture that fails prints one line and evaluation goes on eagerly."""

    def __init__(self, algo: Algorithm, capture: bool = True) -> None:
        self.algo = algo
        self.device = next(algo.parameters()).device
        self.capture = capture and self.device.type == "cuda"
        if self.capture:
            static_shapes()
        self.entries: dict[tuple, tuple[Episode, Optional[torch.cuda.CUDAGraph], Optional[AlgoOutput]]] = {}
        self.episode: Optional[Episode] = None  # the last call's tasks (static ones: overwritten by the next call)

    def __call__(self, sampler, tasks: int) -> AlgoOutput:
        """algo(sampler.sample(tasks), train=False), the same draw and the same result, replayed when it can be."""
        key = (tasks, getattr(sampler, "ways", None), sampler.shots, sampler.queries)
        if key not in self.entries:
            static = self.episode = sampler.sample(tasks)
            out, self.entries[key] = self._first(static)
            return out
        static, graph, outputs = self.entries[key]
        self.episode = sampler.sample(tasks, out=static)
        if graph is None:
            return self.algo(static, train=False)
        graph.replay()

        def fresh(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.clone()  # the next replay overwrites the graph's outputs

        return AlgoOutput(
            fresh(outputs.loss), fresh(outputs.score), outputs.metric, fresh(outputs.step_score), outputs.step_kind,
            fresh(outputs.logits),
        )  # fmt: skip

    def _first(self, static: Episode) -> tuple[AlgoOutput, tuple]:
        """The first batch of a shape, eagerly, then (on CUDA) its capture."""

        def run() -> AlgoOutput:
            return self.algo(static, train=False)

        if not self.capture:
            return run(), (static, None, None)
        out = on_side_stream(run, self.device)
        captured = try_capture(run, self.device, "eval.cuda_graph")
        if captured is None:
            self.capture = False
            return out, (static, None, None)
        return out, (static, captured[0], captured[1])
