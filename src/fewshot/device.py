"""Pick the torch device from the `device` config group."""

from __future__ import annotations

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


def device_label(device: torch.device) -> str:
    """How results name a device: cpu, or cuda with the GPU's model (cuda (NVIDIA H100 80GB HBM3))."""
    return str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: the GPU's free memory, or the machine's available physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
