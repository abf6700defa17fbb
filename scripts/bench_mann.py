#!/usr/bin/env python
"""Time one MANN meta-batch (forward and backward): fewshot's MANN.logits against the step-by-step LSTM cell.

The baseline, `stepwise_logits`, is the plain reading of Santoro et al. 2016: at every step the LSTMCell takes
[image, previous label, reads] and the output layer [h, reads]. MANN.logits computes the same function with the
sequence's part of the cell input and the output layer batched over steps (and the LSTM baseline as one
torch.lstm call). A third form, "compiled", is MANN.logits with algo.compile_step: each step through
torch.compile (not for the CPU's LSTM baseline, which is one torch.lstm call either way). All run in this process
on the same weights and inputs, at the paper's sizes (the presets' mann_omniglot_5way and
lstm_baseline_omniglot_5way: 16 tasks, 50 steps, 20x20 images, controller 200, memory 128 x 40, 4 heads). Prints
one JSON object per model with each form's median milliseconds, the ratios stepwise / ours and ours / compiled,
the seconds the first compiled call took (compilation), and each form's largest difference from the stepwise
logits and gradients.

    python scripts/bench_mann.py [--device cpu|cuda] [--iters 10] [--no-compile]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from fewshot.algorithms.mann import MANN
from fewshot.errors import ConfigError


def stepwise_logits(model: MANN, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """MANN's logits (T, L, ways) one step at a time through model.cell, as the paper describes the network."""
    tasks, length = x.shape[:2]
    h = x.new_zeros(tasks, model.cell.hidden_size)
    c = torch.zeros_like(h)
    if model.memory:  # the LRUA memory as MANN has it: only the LSTM's arrangement differs
        mem, usage, read_w, reads = model.initial_memory(x)
    outputs = []
    for t in range(length):
        if not model.memory:
            h, c = model.cell(torch.cat([x[:, t], previous[:, t]], -1), (h, c))
            outputs.append(model.out(h))
            continue
        h, c = model.cell(torch.cat([x[:, t], previous[:, t], reads], -1), (h, c))
        mem, usage, read_w, reads = model.memory_step(h, mem, usage, read_w)
        outputs.append(model.out(torch.cat([h, reads], -1)))
    return torch.stack(outputs, 1)


def paper_model(memory: bool, ways: int = 5, image_size: int = 20) -> MANN:
    backbone = functools.partial(lambda **kw: None, in_channels=1, image_size=image_size)
    return MANN(backbone, ways, memory=memory)


def inputs(model: MANN, tasks: int, length: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, length, model.pixels, generator=g)
    labels = torch.randint(0, model.ways, (tasks, length), generator=g)
    previous = torch.nn.functional.one_hot(labels, model.ways).float().roll(1, 1)
    previous[:, 0] = 0
    return x.to(device), previous.to(device), labels.to(device)


def ours(compile_step: bool):
    """MANN.logits as a form of bench: eager, or with each step through torch.compile."""

    def logits(model: MANN, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        model.compile_step = compile_step
        return model.logits(x, previous)

    return logits


def grads(model: MANN, logits_fn, x, previous, labels) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = logits_fn(model, x, previous)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=10, help="timed meta-batches per form (after 2 untimed)")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--length", type=int, default=50, help="steps per sequence (5 classes x 10 instances)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled form")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    summary = {}
    for name, memory in (("mann", True), ("lstm_baseline", False)):
        forms = {"stepwise": stepwise_logits, "ours": ours(False)}
        if not args.no_compile and (memory or device.type not in MANN.fused_lstm_devices):
            forms["compiled"] = ours(True)
        torch.manual_seed(0)
        model = paper_model(memory).to(device)
        x, previous, labels = inputs(model, args.tasks, args.length, device)
        ref_logits, ref_grads = grads(model, stepwise_logits, x, previous, labels)
        diffs, compile_s = {}, None
        for k, fn in list(forms.items())[1:]:
            sync()
            tic = time.perf_counter()
            try:
                logits, got = grads(model, fn, x, previous, labels)
            except ConfigError as e:  # torch.compile cannot build here: time the rest
                print(json.dumps({"model": name, "form": k, "error": str(e)}), flush=True)
                del forms[k]
                continue
            sync()
            if k == "compiled":
                compile_s = round(time.perf_counter() - tic, 1)
            diffs[k] = (
                float((ref_logits - logits).abs().max()),
                max(float((a - b).abs().max()) for a, b in zip(ref_grads, got)),
            )
        times: dict[str, list[float]] = {k: [] for k in forms}
        for i in range(args.iters + 2):
            for k, fn in forms.items():  # interleaved, so drifts in the machine's speed hit all forms alike
                sync()
                tic = time.perf_counter()
                grads(model, fn, x, previous, labels)
                sync()
                if i >= 2:
                    times[k].append((time.perf_counter() - tic) * 1e3)
        ms = {k: statistics.median(v) for k, v in times.items()}
        summary[name] = {"ours": round(ms["stepwise"] / ms["ours"], 2)}
        record = {
            "model": name,
            "device": device.type,
            "tasks": args.tasks,
            "steps": args.length,
            **{f"ms_{k}": round(v, 2) for k, v in ms.items()},
            "speedup": summary[name]["ours"],
        }
        if "compiled" in ms:
            summary[name]["compiled"] = round(ms["ours"] / ms["compiled"], 2)
            record.update(speedup_compiled=summary[name]["compiled"], compile_s=compile_s)
        for k, (logit_diff, grad_diff) in diffs.items():
            suffix = "" if k == "ours" else f"_{k}"
            record.update({f"max_logit_diff{suffix}": logit_diff, f"max_grad_diff{suffix}": grad_diff})
        record["threads"] = torch.get_num_threads()
        print(json.dumps(record), flush=True)
    what = "ours = stepwise ms / ours ms, compiled = ours ms / compiled ms (medians, forward + backward)"
    print(json.dumps({"summary": what, "speedup": summary}))


if __name__ == "__main__":
    main()
