"""Write benchmark results into docs/BENCHMARKS.md, one section per benchmark.

Each benchmark owns a section delimited by HTML comments, so several benchmarks can update the
same file without clobbering each other.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"

HEADER = """# Benchmarks

Every figure below was measured by a script in `bench/`; each section names the machine, the date
and the command that produced it. CPU figures are from CPU runs and say so.
"""


def machine_description() -> str:
    """One line describing the machine: CPU model, cores, memory, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def update_section(name: str, body: str, command: str, path: Path = DOCS) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with ``body``.

    A header line with the date, the machine and the command is added above ``body``.
    """
    today = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- bench:{name}:begin -->\n"
        f"## {name}\n\n"
        f"- date: {today}\n- machine: {machine_description()}\n- command: `{command}`\n\n"
        f"{body.rstrip()}\n"
        f"<!-- bench:{name}:end -->\n"
    )
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
