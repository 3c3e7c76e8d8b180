"""Device and mixed-precision choices, in one place.

* :func:`choose_device`: the training device from ``train.device`` (a validated config string) and the local rank.
* :func:`parse_device`: a device given to an evaluation function (None, "auto", "cpu", "cuda", "cuda:N" or a
  :class:`torch.device`), checked against the devices that exist.
* :func:`default_device`: CUDA when available, else the CPU.
* :func:`amp_dtype`: the autocast dtype on a device: bfloat16 on a CUDA device that supports it, else float16
  (``fp16_fallback=False``: None instead, for code that runs without a gradient scaler); None off CUDA.
* :func:`autocast`: ``torch.autocast`` for such a dtype (None: off).
"""

from __future__ import annotations

import torch

from pirl.errors import PirlError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device``: "auto" (CUDA when available), "cpu", "cuda" (this process's ``cuda:<local_rank>``) or
    "cuda:N"; CUDA without a CUDA device is a one-line error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PirlError("train.device=cuda but no CUDA device is available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device("cpu")


def parse_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; anything else is a one-line error."""
    if device in (None, "auto"):
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise PirlError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PirlError(f"device {device} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PirlError(f"device {device} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return dev


def amp_dtype(device: torch.device, *, fp16_fallback: bool = True) -> torch.dtype | None:
    """The autocast dtype on ``device``: None off CUDA; bfloat16 where the GPU supports it, else float16 (or None
    with ``fp16_fallback=False``: float16 without loss scaling can underflow)."""
    if device.type != "cuda":
        return None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if fp16_fallback else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device``'s type; ``dtype=None`` turns it off."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The loss scaler a float16 autocast needs (a no-op one for bfloat16, float32 or no autocast)."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
