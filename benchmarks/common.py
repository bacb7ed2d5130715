"""What every benchmark row records beside its numbers: commit, device, library versions."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def git_commit() -> str:
    """Short hash of the checkout's HEAD ('unknown' outside a git checkout)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device) -> str:
    """The GPU's name, or the CPU model with the number of torch threads."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    v = {"torch": torch.__version__}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = "none"
    return v


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
