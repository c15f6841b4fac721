"""What a benchmark report says about the machine it ran on."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def run_header() -> str:
    """When and where a run started: "2026-12-06 19:14, <CPU>, 2 torch threads, load 1.35"."""
    import torch

    return (f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu_name()}, {torch.get_num_threads()} torch "
            f"threads, load {os.getloadavg()[0]:.2f}")  # fmt: skip


def write_report(path: str | Path, lines: list[str], start: float) -> str:
    """``lines`` with the run's seconds (since ``start``, ``time.time()``) and the load at the
    end, written to ``path`` (atomically) and printed; the text."""
    from air_reg.utils import write_text

    lines = [*lines, "", f"{time.time() - start:.0f} s, load {os.getloadavg()[0]:.2f} at the end."]
    text = "\n".join(lines) + "\n"
    write_text(path, text)
    print(text)
    return text
