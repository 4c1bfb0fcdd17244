"""Wall-clock time of one call, with the GPU's queued work counted in."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def timed(run: Callable[[], T], device: str) -> tuple[float, T]:
    """Seconds of one call of ``run`` and its result; on ``cuda`` the device is synchronised
    before and after, so that the kernels it launched are inside the time."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out
