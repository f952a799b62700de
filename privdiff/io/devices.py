"""The torch device a run uses, checked before any model is loaded."""

from __future__ import annotations

import torch

from privdiff.errors import PrivdiffError

SUPPORTED = ("cpu", "cuda", "mps", "xpu")


def check_device(name: str | None) -> str:
    """``name`` as a torch device string that this machine has; None picks "cuda" if available, else "cpu".

    Unknown names, unsupported device types, backends that are not available and device indices beyond
    the count raise a one-line PrivdiffError naming the value.
    """
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name.strip()) if isinstance(name, str) else None
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in SUPPORTED:
        raise PrivdiffError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or xpu")
    if device.type == "cpu":
        return "cpu"
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        raise PrivdiffError(f"device {name!r} is not available on this machine (torch {torch.__version__} "
                            f"sees no {device.type} device); use cpu")
    count = 1 if device.type == "mps" else backend.device_count()
    if device.index is not None and device.index >= count:
        raise PrivdiffError(f"device {name!r} does not exist: this machine has {count} {device.type} "
                            f"device(s), {device.type}:0 to {device.type}:{count - 1}")
    return str(device)
