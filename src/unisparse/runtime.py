"""Where and in what precision a stage runs: device, dtype and threads as parameters, never assumptions.

``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``dtype``: the model's parameter dtype; statistics, losses and scores stay in float32 whatever it is.
Pure Python at import (torch is imported where a value is resolved), so the workflow can check a
config against these values without importing torch.
"""

from __future__ import annotations

import re

from .choices import DTYPES  # noqa: F401  (re-exported: the CLI's --dtype choices)

DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+)$"  # matched in full (re.fullmatch: no trailing newline)
DEFAULTS = {"device": "auto", "dtype": "float32"}


def check_device(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN.strip("^$"), name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def resolve_device(name: str = "auto"):
    """A ``torch.device``; asking for CUDA where there is none is an error, not a silent CPU run."""
    import torch

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} asked for, but this machine has no CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def resolve_dtype(name: str = "float32"):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def synchronize(device) -> None:
    """Wait for the device's queued work (timings on an asynchronous device are meaningless without)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device, dtype) -> dict:
    """What a measured time was measured on: device name, dtype, PyTorch (and CUDA) version."""
    import platform

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def return_freed_memory() -> None:
    """Make the C allocator hand large freed blocks back to the system at once (glibc: allocations
    of 1 MiB and more are memory-mapped, and its threshold no longer rises as blocks are freed). A
    training process frees and reallocates tensors of every size each step; glibc otherwise keeps
    them in its heap, and a rank's resident memory grows to the sum of every size it ever held
    (measured: a two-process run on the CPU at 3.0 GB where its tensors took 1.3 GB). It costs about
    5% of a CPU step's time (page faults of fresh mappings; docs/testing.md)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (a fixed value also stops its dynamic rise)
    except (OSError, AttributeError):
        pass
