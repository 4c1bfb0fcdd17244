"""argparse types of the command line: numbers checked where they are given, so a bad one is
named by argparse with what was expected, rather than a traceback where it is used."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bounded(name: str, lowest: int, highest: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``lowest`` to ``highest`` (argparse says what is
    wrong with any other, rather than a traceback where it is used)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, found {text!r}") from None
        if not lowest <= value <= highest:
            raise argparse.ArgumentTypeError(
                f"expected {name} from {lowest} to {highest}, found {value}"
            )
        return value

    return parse


port_number = bounded("a port", 1, 65535)
row_id = bounded("an id", 1, 2**63 - 1)
row_count = bounded("a number of rows", 1, 2**31 - 1)
