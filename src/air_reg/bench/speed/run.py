"""One speed-benchmark run: every section in order, then the report, CSVs and plot."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from air_reg.utils import write_text

from .levers import lever_section, profile_section
from .models import model_specs
from .profiles import PROFILES, Profile
from .report import plot, report
from .sections import (
    growth_exponents,
    inference_section,
    memory_section,
    scaling_section,
    size_section,
    train_section,
)
from .tables import csv_text

log = logging.getLogger(__name__)


def naive_speedup(rows: list[dict]) -> float | None:
    """Section 1's ours ÷ naive (matched widths) for AiR-single, the first row of section 5."""
    row = next((r for r in rows if r["model"] == "AiR-single p2 naive, matched widths"), {})
    return row.get("ours ÷ this (time)")


def run_sections(profile: Profile) -> tuple[dict, dict, dict]:
    """Every section's rows, the load average at each section's start, and seconds taken."""
    specs, res, loads, took = model_specs(profile), {}, {}, {}
    sections = {
        "training": lambda: train_section(profile, specs),
        "inference": lambda: inference_section(profile, specs),
        "memory": lambda: memory_section(profile, specs),
        "sizes": lambda: size_section(profile),
        "scaling": lambda: scaling_section(profile),
        "levers": lambda: lever_section(profile, naive_speedup(res["training"])),
        "profile": lambda: profile_section(profile),
    }
    for key, fn in sections.items():
        loads[key] = os.getloadavg()
        log.info("section %s (load %.2f)", key, loads[key][0])
        start = time.perf_counter()
        res[key] = fn()
        took[key] = time.perf_counter() - start
    loads["end"] = os.getloadavg()
    res["exponents"] = growth_exponents(res["scaling"])
    return res, loads, took


def run(name: str, out: Path) -> dict[str, list[dict]]:
    """Run profile ``name`` (full, quick, smoke); write benchmark.md, benchmark.png and one CSV
    per section to ``out``. Returns every section's rows."""
    profile = PROFILES[name]
    res, loads, took = run_sections(profile)
    for key, rows in res.items():
        write_text(out / f"{key}.csv", csv_text(rows))
    write_text(out / "benchmark.md", report(name, profile, res, loads, took))
    plot(out / "benchmark.png", res)
    log.info("wrote %s in %.0f s", out / "benchmark.md", sum(took.values()))
    return res
