"""Pick the torch device from the `device` config group."""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from typing import Optional

import torch

from fewshot.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else CPU with a notice on stderr. cuda without CUDA is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        print("fewshot: no CUDA device found, running on CPU (device=auto)", file=sys.stderr)
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device.name={name!r} is not one of auto, cpu, cuda, cuda:N")


def use_channels_last(setting: Optional[bool], device: torch.device, cpu_default: bool) -> bool:
    """device.channels_last: null is the algorithm's measured choice on a CPU (cpu_default,
    Algorithm.cpu_channels_last); false is off; true is on, refused on CUDA, where NHWC is unmeasured and vmap, which
    the metric algorithms' evaluation runs, refused NHWC inputs on an H100 (scripts/bench_maml.py)."""
    if setting and device.type == "cuda":
        raise ConfigError(
            "device.channels_last=true is not measured on CUDA and may fail under vmap there; drop it "
            "(STEPS=layout bash scripts/bench_gpu.sh measures it)"
        )
    if setting is not None:
        return bool(setting)
    return cpu_default and device.type == "cpu"


# glibc's mallopt parameters (malloc.h): the heap's top kept before trimming, the size from which blocks are mmap'd,
# and how many blocks may be mmap'd.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_kept = False  # whether this process keeps freed memory: mallopt has no undo that restores glibc's own behaviour


@functools.cache
def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (whose mallopt this module sets), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


def keep_freed_memory(setting: Optional[bool], device: torch.device) -> bool:
    """Applies device.keep_freed_memory; returns whether this process now keeps freed memory. glibc serves each block
    over 32 MB (a 60-way Conv4 step's activations) with its own mmap and returns it to the OS when freed, so the next
    step faults it in again page by page and zeroes it: 128,000-137,000 page faults per 60-way ProtoNets training
    step. On, the blocks the main thread frees stay in the heap for its next step (mallopt: no mmap, no trimming;
    threads' arenas still map what does not fit them), as CUDA's caching allocator keeps its blocks. null is on for
    a CPU run under glibc and off otherwise; true without glibc is refused; false leaves malloc as it is, which is
    still kept where an earlier run in this process (a sweep's job) turned it on. Once on, the memory stays the
    process's until it exits, and the heap holds more than the peak: glibc reuses freed blocks once several lie free
    (8 for a 40 MB tensor made and freed over and over; 150 iterations of 60-way ProtoNets peaked at 1,569 MiB
    resident against 1,326). The numbers are the same either way; scripts/bench_malloc.py measures the time."""
    global _kept
    if not (device.type == "cpu" if setting is None else setting):
        return _kept
    libc = _glibc()
    if libc is None:
        if setting:
            raise ConfigError(
                f"device.keep_freed_memory=true sets glibc's malloc, and this is {platform.system()} "
                f"({platform.libc_ver()[0] or 'no glibc'}); drop it"
            )
        return _kept
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # int: the largest value mallopt takes
    _kept = True
    return True


def device_label(device: torch.device) -> str:
    """How results name a device: cpu, or cuda with the GPU's model (cuda (NVIDIA H100 80GB HBM3))."""
    return str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: the GPU's free memory, or the machine's available physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
