"""What the benches' command lines share: counts and durations checked by argparse, the refusal
of a CUDA device that is not there, and the exit of ``python -m bench.<name>``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import NoReturn

from dicom_node.argtypes import bounded
from dicom_node.errors import GlioforecastError

#: argparse type of a number of runs, repeats, patients...: with 0 there is nothing to measure
count = bounded("a count", 1, 2**31 - 1)


def seconds(text: str) -> float:
    """argparse type: a duration in seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, found {text!r}") from None
    if not value > 0:  # NaN included
        raise argparse.ArgumentTypeError(f"expected seconds more than 0, found {value:g}")
    return value


def refuse_missing_cuda(parser: argparse.ArgumentParser, device: str) -> None:
    """argparse's usage error when ``device`` is a CUDA device and torch finds none, before
    anything is generated, started or trained."""
    import torch  # here: only the benches with --device load it for this

    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: expected a CUDA device, torch finds none")


def exit_with(main: Callable[[], int], *, stop_on_sigterm: bool = False) -> NoReturn:
    """Exit with ``main()``'s code. One of the project's own errors ends it as one line on
    stderr and code 2, as argparse ends a bad option, rather than as a traceback.

    With ``stop_on_sigterm``, SIGTERM raises SystemExit (code 143) in ``main``, so that its
    ``finally`` blocks stop the servers it started and remove its temp folders, as on Ctrl-C.
    """
    if stop_on_sigterm:
        signal.signal(signal.SIGTERM, _stop)
    try:
        code = main()
    except GlioforecastError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


def _stop(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_IGN)  # the cleanup runs to its end; SIGKILL still ends it
    raise SystemExit(128 + signum)
