"""Round trips of air-reg's fields with SimpleITK and antspyx, on three geometries.

    python experiments/interop_roundtrip.py      # -> experiments/results/interop/table.md

The work: air_reg.bench.interop.roundtrip (the tests hold the same comparisons).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from air_reg.bench.interop import roundtrip

OUT = Path(__file__).parent / "results" / "interop"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    tic = time.time()
    rows = roundtrip()
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append(
            "| " + " | ".join(v if isinstance(v, str) else f"{v:.2e}" for v in r.values()) + " |"
        )
    table = "\n".join(lines)
    OUT.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (OUT / "table.md").write_text(
        f"# Round trips with SimpleITK and antspyx\n\n`python {' '.join(sys.argv)}`, {when}, "
        f"{platform.machine()} {platform.python_version()}, {time.time() - tic:.1f} s. Images in "
        f"[0, 1], 64 x 80, a known smooth field up to 5 px; intensity gaps where the sample point "
        f"lies inside the moving image.\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    main()
