"""The record of a folder registration: which pairs are done, which failed, and the summaries.

Each finished pair (its outputs already written atomically) is appended as one CSV line to
``<out>/.progress.csv`` and flushed, so a run killed at any moment leaves a log of complete
pairs (a torn last line is ignored and its pair redone). ``resume=True`` reads it back and skips
those pairs. At the end ``summary.csv`` (every pair, with an ``error`` column) and, when any
failed, ``failures.csv`` are written atomically.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from air_reg.utils import write_with

log = logging.getLogger(__name__)

PROGRESS = ".progress.csv"


class PairLog:
    """Rows of a folder run, appended as pairs finish; ``fields`` are the summary's columns."""

    def __init__(
        self, out_dir: Path, fields: tuple[str, ...], *, resume: bool, persist: bool = True
    ) -> None:
        """``persist=False`` (two files, not folders): no progress file, rows in memory."""
        self.out_dir, self.fields = out_dir, (*fields, "error")
        self.path = out_dir / PROGRESS
        self.rows: dict[str, dict] = self._read() if resume and persist else {}
        self.rows = {k: r for k, r in self.rows.items() if not r["error"]}  # retry failures
        if resume:
            log.info("resume: %d pair(s) already done in %s", len(self.rows), out_dir)
        self._fh = self._writer = None
        if persist:
            with open(self.path, "w", newline="") as fh:  # the log restarts with the kept rows
                writer = csv.DictWriter(fh, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(self.rows.values())
            self._fh = open(self.path, "a", newline="")  # noqa: SIM115 (closed in close())
            self._writer = csv.DictWriter(self._fh, fieldnames=self.fields)

    def _read(self) -> dict[str, dict]:
        if not self.path.is_file():
            log.warning("resume: no %s in %s, starting afresh", PROGRESS, self.out_dir)
            return {}
        lines = self.path.read_text().splitlines(keepends=True)
        whole = [ln for ln in lines if ln.endswith("\n")]  # a kill mid-write tears the last
        if len(whole) < len(lines):
            log.warning("resume: ignored a torn last line of %s (its pair is redone)", PROGRESS)
        rows = [r for r in csv.DictReader(whole) if r.get("name") and None not in r.values()]
        return {r["name"]: r for r in rows}

    def done(self, name: str) -> bool:
        return name in self.rows

    def add(self, row: dict) -> None:
        """Record a finished (or failed: ``row["error"]``) pair, durably."""
        row = {"error": "", **row}
        self.rows[row["name"]] = row
        if self._writer is not None:
            self._writer.writerow(row)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.rows.values() if r["error"]]

    def close(self, write: bool = True) -> None:
        """Write summary.csv (all pairs, sorted by name) and failures.csv (when any failed)."""
        if self._fh is not None:
            self._fh.close()
        if not write:
            return
        rows = sorted(self.rows.values(), key=lambda r: r["name"])
        write_with(self.out_dir / "summary.csv", lambda p: _write(p, self.fields, rows))
        failed = [r for r in rows if r["error"]]
        columns = ("name", "fixed", "moving", "error")
        if failed:
            write_with(self.out_dir / "failures.csv", lambda p: _write(p, columns, failed))
        else:
            (self.out_dir / "failures.csv").unlink(missing_ok=True)


def _write(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
