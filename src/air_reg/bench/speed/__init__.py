"""The CPU speed and memory benchmark: our AiR/MAPT against the naive ``nn.Transformer``.

``run(name, out)`` runs a profile (``PROFILES``: full, quick, smoke) and writes its report;
``experiments/benchmark.py`` is its command line, ``experiments/gpu_throughput.py`` that of
``gpu``. Modules: ``profiles`` (what a run measures), ``models`` (the benchmarked specs),
``timing`` (timed jobs, interleaving), ``children`` (fresh-process measurements),
``sections`` and ``levers`` (one function per report section), ``report`` and ``tables``
(markdown, CSV, plot), ``run`` (one run, in order), ``gpu`` (GPU throughput).
"""

from .profiles import PROFILES, Profile
from .run import run

__all__ = ["PROFILES", "Profile", "run"]
