"""device.keep_freed_memory: freed blocks stay in the process instead of going back to the OS (glibc's mallopt), which
scripts/bench_malloc.py measured faster on a CPU; the numbers are the same either way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fewshot.device as device_module
from conftest import REPO
from fewshot import engine
from fewshot.device import keep_freed_memory
from test_engine import TINY

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
KEEP = [(-4, 0), (-1, 2**31 - 1)]  # glibc's malloc.h: M_MMAP_MAX none, M_TRIM_THRESHOLD as high as an int goes


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(device_module, "_glibc", lambda: fake)
    monkeypatch.setattr(device_module, "_kept", False)
    return fake


@pytest.mark.parametrize(
    "setting, device, on",
    [(None, CPU, True), (None, CUDA, False), (False, CPU, False), (True, CPU, True), (True, CUDA, True)],
)
def test_the_setting_decides_and_sets_mallopt(libc, setting, device, on):
    assert keep_freed_memory(setting, device) is on
    assert libc.calls == (KEEP if on else [])


def test_false_after_a_run_that_kept_it_says_it_is_still_kept(libc):
    # mallopt cannot restore glibc's own behaviour, so a sweep's later job with false records what it runs with
    assert keep_freed_memory(None, CPU) and keep_freed_memory(False, CPU) and keep_freed_memory(None, CUDA)
    assert libc.calls == KEEP


def test_without_glibc_null_is_off_and_true_is_refused(monkeypatch):
    monkeypatch.setattr(device_module, "_glibc", lambda: None)
    monkeypatch.setattr(device_module, "_kept", False)
    assert keep_freed_memory(None, CPU) is False
    with pytest.raises(engine.ConfigError, match="device.keep_freed_memory=true sets glibc's malloc"):
        keep_freed_memory(True, CPU)


@pytest.mark.parametrize("setting, calls", [("null", KEEP), ("false", [])])
def test_a_cpu_run_applies_and_records_it_when_built(compose_cfg, libc, setting, calls):
    run = engine.build(compose_cfg("train", [*TINY, "algo=protonet", f"device.keep_freed_memory={setting}"]))
    assert libc.calls == calls
    assert run.record["keep_freed_memory"] is bool(calls)


# In a fresh interpreter, whose malloc nothing has set yet: the page faults of allocating and freeing a 40 MB tensor
# (above glibc's largest mmap threshold, 32 MB), and a digest of a conv net's weights after three Adam steps whose
# activations (51 MB) are above it too.
PROBE = """
import hashlib, resource, sys
import torch
from fewshot.device import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory(True, torch.device("cpu"))
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):  # kept, glibc's heap reuses freed blocks once it holds enough of them (8 here)
    torch.ones(10 << 20)
before = faults()
for _ in range(4):
    torch.ones(10 << 20)
print(faults() - before)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU())
opt = torch.optim.Adam(net.parameters(), 1e-2)
x = torch.randn(256, 1, 28, 28)
for _ in range(3):
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.parameters())).hexdigest())
"""


@pytest.mark.skipif(device_module._glibc() is None, reason="keep_freed_memory sets glibc's malloc; this is not glibc")
def test_kept_memory_is_not_faulted_in_again_and_the_numbers_are_the_same():
    def probe(arm: str) -> tuple[int, str]:
        out = subprocess.run([sys.executable, "-c", PROBE, arm], capture_output=True, text=True, check=True)
        faults, digest = out.stdout.split()
        return int(faults), digest

    (glibc_faults, glibc_digest), (kept_faults, kept_digest) = probe("glibc"), probe("keep")
    # glibc maps each 40 MB tensor anew: 4 x 10,240 pages of 4 KB, or 4 x 20 of 2 MB where transparent huge pages
    # back every mapping (enabled=always)
    assert glibc_faults >= 40 and kept_faults * 10 < glibc_faults, (glibc_faults, kept_faults)
    assert kept_digest == glibc_digest


# scripts/bench_malloc.py's arms, in a fresh interpreter (the heap a test worker's earlier runs leave would serve the
# "glibc" arm's request): the "glibc" arm must fault large blocks in again as glibc left alone does, or its ratio
# would measure nothing; glibc first, since a block the kept arm leaves free serves glibc's next request too (the
# benchmark prints each arm's faults beside an untouched step's for that reason)
ARMS = """
import importlib.util, json, sys
import torch
spec = importlib.util.spec_from_file_location("bench_malloc", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
closures, counts = bench.arms({"step": lambda: float(torch.ones(10 << 20)[0])})
for name in ("step glibc", "step glibc", *["step kept"] * 12):  # kept: once the heap holds enough freed blocks
    closures[name]()
print(json.dumps(counts))
"""


@pytest.mark.skipif(device_module._glibc() is None, reason="bench_malloc.py compares glibc's malloc settings")
def test_the_benchmark_arms_map_and_keep_as_they_say():
    script = str(REPO / "scripts" / "bench_malloc.py")
    counts = json.loads(
        subprocess.run([sys.executable, "-c", ARMS, script], capture_output=True, text=True, check=True).stdout
    )
    assert min(counts["step glibc"]) >= 10 and counts["step kept"][-1] * 10 < min(counts["step glibc"]), counts
