"""Two builds of the fused level loops side by side (issue #31): the working tree's
``csrc/refine_loop.cpp`` against a git revision's, on the default preset's level calls
(``refine_steps=60``, model-free) of one pair a size, the builds alternating call by call.

    python experiments/loop_ab.py --base HEAD~1             # ~1 min on 2 cores
    python experiments/loop_ab.py --base HEAD~1 --volume    # + refine_loop3d.cpp, 2 mm MNI152

Both builds are compiled here with the kernels' own flags (``speed.kernels``) from the
sources and headers of their revision, each into its own library; the level calls are
recorded once (``refine_loop.adam_level`` during ``refine``) and replayed on fresh copies of
their state, so both builds run the same computation from the same start. Per call: the
median ms of each build, the median over rounds of the per-round ratio base / working tree,
and the largest difference of the control grids they leave (threads sum in another order).
Pairs: ``bench.refine_matrix.make_pairs(size, "same", 1)`` at 28 x 28, 233 x 197 and 512 x 512;
``--volume`` adds ``bench.volumes.pair("small", 0)``. The C structs must be the same in both
revisions (refused otherwise).
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from air_reg.bench import refine_matrix as rm
from air_reg.bench.machine import run_header, write_report
from air_reg.refine import RefineSettings, refine
from air_reg.speed import kernels
from air_reg.speed import refine_loop as rl

ROOT = Path(__file__).resolve().parents[1]
CSRC = "src/air_reg/speed/csrc"
LOOPS = {  # source, symbol, its ctypes struct, the C struct's name
    "2d": ("refine_loop.cpp", "air_refine_level", rl._Level, "AirRefineLevel"),
    "3d": ("refine_loop3d.cpp", "air_refine_level3d", rl._Level3, "AirRefineLevel3"),
}


def _text(rev: str | None, name: str) -> str | None:
    """A csrc file at ``rev`` (None: the working tree), or None where it does not exist."""
    if rev is None:
        path = ROOT / CSRC / name
        return path.read_text() if path.is_file() else None
    got = subprocess.run(["git", "show", f"{rev}:{CSRC}/{name}"], cwd=ROOT, text=True,
                         capture_output=True)  # fmt: skip
    return got.stdout if got.returncode == 0 else None


def build(rev: str | None, source: str, folder: Path) -> Path:
    """``source`` and the headers of ``rev`` compiled into ``folder``/lib.so."""
    folder.mkdir(parents=True)
    for name in (source, *(h.name for h in kernels.HEADERS)):
        text = _text(rev, name)
        if text is not None:
            (folder / name).write_text(text)
    lib, cxx = folder / "lib.so", kernels._compiler()
    for extra in kernels.OPTIONAL_FLAGS:
        cmd = [cxx, *kernels.FLAGS, *extra, str(folder / source), "-o", str(lib)]
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return lib
    sys.exit(f"loop_ab: {source} at {rev or 'the working tree'} does not build here")


def same_struct(base: str, struct: str, source: str) -> bool:
    """Whether ``struct``'s definition is the same at ``base`` and in the working tree."""
    pattern = re.compile(rf"struct {struct} \{{.*?\n\}};", re.S)
    found = [pattern.search(_text(rev, source) or "") for rev in (base, None)]
    return all(found) and found[0].group() == found[1].group()


def record(pairs) -> list[tuple]:
    """The level calls (args, kwargs) ``refine`` makes on each (fixed, moving), state copied."""
    calls, original = [], rl.adam_level

    def keep(*args, **kw):
        copy = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
        calls.append(([copy(a) for a in args], {k: copy(v) for k, v in kw.items()}))
        return original(*args, **kw)

    rl.adam_level = keep
    try:
        for fixed, moving in pairs:
            refine(fixed, moving, None, RefineSettings(steps=60))
    finally:
        rl.adam_level = original
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the git revision to compare against")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8, help="alternations of the two builds")
    ap.add_argument("--volume", action="store_true", help="also a 2 mm MNI152 volume pair")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (.md)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start, header = time.time(), run_header()
    kinds = ["2d", "3d"] if args.volume else ["2d"]
    libs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            source, symbol, level, struct = LOOPS[kind]
            if _text(args.base, source) is None:
                sys.exit(f"loop_ab: no {CSRC}/{source} at {args.base!r} (a git revision here?)")
            if not same_struct(args.base, struct, source):
                sys.exit(f"loop_ab: struct {struct} differs at {args.base}: calls won't fit")
            for side, rev in (("base", args.base), ("tree", None)):
                fn = getattr(ctypes.CDLL(str(build(rev, source, Path(tmp, kind, side)))), symbol)
                fn.argtypes, fn.restype = [ctypes.POINTER(level), *[ctypes.c_int] * 4], None
                libs[kind, side] = fn
        pairs = [(p["fixed"][:1], p["moving"][:1])
                 for p in (rm.make_pairs(s, "same", 1) for s in rm.SIZES)]  # fmt: skip
        if args.volume:
            from air_reg.bench import volumes

            v = volumes.pair("small", 0, mm=2)
            pairs.append((v["fixed"], v["moving"]))
        calls = record(pairs)
        rows = _time(calls, libs, args.rounds)
    lines = [
        f"# Two builds of the level loops: {args.base} against the working tree",
        "",
        f"{header}; `python experiments/loop_ab.py --base {args.base}"
        f"{' --volume' if args.volume else ''}`; {args.threads} torch threads, "
        f"{args.rounds} rounds alternating the builds.",
        "",
        "| level (image) | steps | base ms | tree ms | base / tree | grid diff |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    if args.out:
        write_report(args.out, lines, start)  # prints it too
    else:
        print("\n".join(lines))


def _time(calls, libs, rounds: int) -> list[str]:
    """Each call replayed ``rounds`` times a build, alternating: the table's rows."""
    chosen, original = {}, rl._function
    rl._function = lambda name="air_refine_level", *a, **k: (  # noqa: E731
        chosen.get(name) or original(name, *a, **k)
    )
    rows = []
    try:
        for args, kw in calls:
            kind = "3d" if args[4].ndim == 5 else "2d"
            ms, left = {"base": [], "tree": []}, {}
            repeat = 10 if args[4][0, 0].numel() < 4096 else 1  # tiny levels: 10 calls a time
            for r in range(rounds):
                for side in ("base", "tree") if r % 2 else ("tree", "base"):
                    chosen[LOOPS[kind][1]] = libs[kind, side]
                    t = time.perf_counter()
                    for _ in range(repeat):
                        state = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                        rl.adam_level(*state, **kw)
                    ms[side].append(1000 * (time.perf_counter() - t) / repeat)
                    left[side] = state[0]
            ratio = statistics.median(b / t for b, t in zip(ms["base"], ms["tree"], strict=True))
            diff = float((left["base"] - left["tree"]).abs().max())
            base, tree = statistics.median(ms["base"]), statistics.median(ms["tree"])
            size = " x ".join(map(str, args[4].shape[2:]))
            rows.append(f"| {size} | {kw['steps']} | {base:.1f} | {tree:.1f} | {ratio:.2f}x | "
                        f"{diff:.1e} |")  # fmt: skip
    finally:
        rl._function = original
    return rows


if __name__ == "__main__":
    main()
