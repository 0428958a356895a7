"""The one device a run computes on: teachers, students, pool scoring (local engine) and features.

``auto`` takes CUDA when present, else Apple's MPS, else the CPU. An explicit accelerator that this
machine lacks is refused in one line before any data is read: a run asked for ``cuda`` that fell back
to the CPU would take hours longer without saying why. The CPU path is the reference: it computes
exactly what plada computed before devices existed, so payloads stay byte-identical there.

Syntax is checked without importing torch (configs check cheaply); availability needs torch and is
only asked for when an accelerator is named explicitly, or when a run resolves its device.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import PladaError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_SYNTAX = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def check_syntax(name: object) -> None:
    """Refuse a device name plada does not know (``tpu``, ``cuda:x``), without importing torch."""
    if not isinstance(name, str) or not _SYNTAX.fullmatch(name):
        raise PladaError(f"unknown device {name!r} (have: {', '.join(DEVICES)})")


def check(name: object) -> None:
    """Syntax, and for an explicitly named accelerator its presence: what a config's check() refuses."""
    check_syntax(name)
    if name not in ("auto", "cpu"):
        resolve(str(name))


def resolve(name: str = "auto") -> torch.device:
    """The torch device ``name`` means on this machine; an absent accelerator is a PladaError."""
    import torch

    check_syntax(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise PladaError("device mps was asked for, but this machine has no Apple MPS device; use --device cpu "
                             "or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise PladaError(f"device {name} was asked for, but this machine has no CUDA GPU (or torch was built without "
                         "CUDA); use --device cpu or auto")
    dev = torch.device(name)
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise PladaError(f"device {name} does not exist: this machine has {count} CUDA GPU(s), "
                         f"cuda:0..cuda:{count - 1}")
    return dev


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def as_device(device: torch.device | str | None) -> torch.device:
    """A library call's ``device`` argument as a torch device; None is the CPU, what every caller had before."""
    import torch

    if device is None:
        return torch.device("cpu")
    return device if isinstance(device, torch.device) else resolve(device)


def amp_dtype(device: torch.device, capability: tuple[int, int] | None = None) -> torch.dtype | None:
    """The autocast dtype on ``device``: None (full float32) off CUDA, bf16 from Ampere on, else fp16.

    Why bf16 where it exists: the same range as float32, so training needs no loss scaling. Why not on
    MPS or the CPU: the CPU must compute exactly what it always did, and MPS autocast is too young to
    trust with a fine-tune. ``capability`` (major, minor) defaults to the device's own.
    """
    import torch

    if device.type != "cuda":
        return None
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def needs_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 and float32 ones do not."""
    import torch

    return dtype == torch.float16


@contextmanager
def placed(model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """``model`` on ``device`` (channels_last on CUDA) for a block, then back where and how it was.

    Why borrow rather than move for good: callers hash, save and hand models to Ray actors as CPU
    tensors; a model that quietly stayed on the GPU would break them, and the round trip is exact.
    """
    import torch

    home = next(model.parameters()).device
    cuda = device.type == "cuda"
    if device == home and not cuda:
        yield model
        return
    with torch.inference_mode(False):  # weights copied under inference mode could never be trained again
        if cuda:
            model.to(device, memory_format=torch.channels_last)
        else:
            model.to(device)
    try:
        yield model
    finally:
        with torch.inference_mode(False):
            model.to(home, memory_format=torch.contiguous_format)
