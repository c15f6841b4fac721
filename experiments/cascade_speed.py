"""The shipped AiR-Match one-shot (its cascade of up to 6 passes) with the fixed images encoded
once (``contract.fixed_state``, the default) against once a pass (the network without the
option), interleaved in one run, on the held-out families (issue #32's time target); then the
network's calls of a few pairs (``registrar.CPU_CALL_PIXELS``, the default) against a whole
batch in one call, one-shot as ``register`` runs it, and one pass at several sizes and call
sizes (the choice of ``CPU_CALL_PIXELS``); then the local window match on its kernel
(``speed.local_match``, the default) against the torch ops; and the default one-shot on the
pairs shrunk to 3/4 and 1/2 of their size, its flow brought back (time against accuracy:
can a lower resolution buy issue #32's 1/100 of ANTs' time?); and one pass on larger images
with the global match's scores in cache-sized chunks (``matching.INFER_SCORES``, the default)
against chunks of ``max_tokens``^2 scores.

    python experiments/cascade_speed.py                 # ~7 min on 2 cores; results/cascade_speed/
    python experiments/cascade_speed.py --tables large  # one table (names: --help)

Each comparison is of the same computation: the flows must be equal (``torch.equal``; calls of
other sizes: within 1e-3 px, the float order of the convolutions).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import air_reg
from air_reg import metrics, zoo
from air_reg.bench import families
from air_reg.bench.machine import run_header, write_report
from air_reg.bench.refinement import interleaved_times
from air_reg.models.components import matching
from air_reg.models.components.matching import LocalMatch
from air_reg.models.components.spatial_transformer import resize_flow
from air_reg.refine import registrar
from air_reg.refine.flows import apply_repeatedly
from air_reg.refine.optimise import PREALIGN_MIN_SIDE

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def patched(module, name: str, value):
    """``module.name`` set to ``value`` inside the block, restored after it."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


class EveryPass(torch.nn.Module):
    """``net`` without ``encode_fixed``: the cascade encodes the fixed images every pass."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, fixed, moving):
        return self.net(fixed, moving)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=18, help="pairs a family, one batch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES),
                   help="which tables to make (default: all)")  # fmt: skip
    args = p.parse_args(argv)
    start, head = time.time(), run_header()
    title = "The one-shot cascade: the fixed images encoded once; calls of a few pairs"
    lines = [f"# {title} ({head})", "",
             f"`python experiments/cascade_speed.py --pairs {args.pairs} --rounds {args.rounds} "
             f"--tables {' '.join(args.tables)}`: the shipped default model, the rows of a "
             "table interleaved, median over rounds."]  # fmt: skip
    reg = air_reg.load_model(zoo.WEIGHTS_DIR / f"{zoo.default_weights()}.ckpt")
    if "encode" in args.tables:
        lines += encoded_once(reg, args.pairs, args.rounds)
    if "calls" in args.tables:
        lines += calls_of_a_few_pairs(reg, args.pairs, args.rounds)
    if "call_sizes" in args.tables:
        lines += call_sizes(reg.net, args.rounds)
    if "local" in args.tables:
        lines += local_match_kernel(args.pairs, args.rounds)
    if "resolution" in args.tables:
        lines += lower_resolution(reg, args.pairs, args.rounds)
    if "large" in args.tables:
        lines += large_images(reg.net, args.rounds)
    name = "README.md" if args.tables == list(TABLES) else f"{'_'.join(args.tables)}.md"
    write_report(REPO / "experiments" / "results" / "cascade_speed" / name, lines, start)


def encoded_once(reg, pairs: int, rounds: int) -> list[str]:
    """The cascade with the fixed images encoded once (``encode_fixed``) against every pass."""
    passes, affine, tol = reg.cascade, reg.cascade_affine, reg.cascade_tol
    nets = {"fixed encoded once": reg.net, "fixed encoded every pass": EveryPass(reg.net)}
    lines = ["", "The one-shot cascade (no affine stage) on the held-out families (160 x 208), "
             "one call a family, the fixed images encoded once or every pass; flows "
             "torch.equal:", "",
             "| family | pairs | fixed encoded once, ms/pair | every pass, ms/pair | ratio |",
             "|---|---|---|---|---|"]  # fmt: skip

    def rows_of(f, m):
        return {k: (lambda n=n: apply_repeatedly(n, f, m, passes, affine, tol))
                for k, n in nets.items()}  # fmt: skip

    for name, _, times, flows in per_family(rows_of, pairs, rounds):
        if not torch.equal(*flows.values()):
            raise SystemExit(f"{name}: the two rows' flows differ")
        once, every = (statistics.median(times[k]) for k in nets)
        lines.append(f"| {name} | {pairs} | {once:.1f} | {every:.1f} | {every / once:.2f} |")
    return lines


def calls_of_a_few_pairs(reg, pairs: int, rounds: int) -> list[str]:
    """``reg.one_shot`` on a family's batch: the network given at most ``CPU_CALL_PIXELS``
    pixels a call (the default) against the whole batch in one call."""
    default = registrar.CPU_CALL_PIXELS
    lines = ["", f"One-shot (`Registrar.one_shot`: the affine stage, up to 6 passes), {pairs} "
             f"pairs a family in one call; the network given at most {default} pixels a call "
             f"({registrar.pairs_per_call(torch.zeros(1, 1, *families.SIZE))} pairs of "
             f"{families.SIZE[0]} x {families.SIZE[1]}) or the whole batch:", "",
             "| family | a few pairs a call, ms/pair | whole batch, ms/pair | ratio | "
             "max flow difference, px |", "|---|---|---|---|---|"]  # fmt: skip

    def one_shot(f, m, limit):
        with patched(registrar, "CPU_CALL_PIXELS", limit):
            return reg.one_shot(f, m)

    return lines + one_shot_ab(
        lambda f, m: {k: (lambda limit=limit: one_shot(f, m, limit))
                      for k, limit in {"few": default, "whole": 2**62}.items()},
        pairs, rounds, "calls of a few pairs",
    )  # fmt: skip


SIZES = {(28, 28): (256, 16, 64, 256), (96, 128): (32, 2, 8, 32), (160, 208): (16, 1, 2, 4, 8, 16),
         (256, 256): (8, 1, 2, 4, 8)}  # fmt: skip  # size: (pairs, then call sizes)


def call_sizes(net, rounds: int) -> list[str]:
    """One pass of ``net`` on random pairs, ms a pair, in calls of several sizes."""
    lines = ["", "One pass of the network (random pairs, no affine stage), ms a pair by pairs "
             "a call (the row's fastest in bold; the default's call size is among them):", "",
             "| size | pairs | pairs a call: ms/pair |", "|---|---|---|"]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for size, (n, *per_call) in SIZES.items():
        f, m = torch.rand(2, n, 1, *size, generator=g)
        default = min(n, registrar.pairs_per_call(f))  # what a Registrar gives it
        rows = {c: (lambda c=c, f=f, m=m, n=n: [net(f[i : i + c], m[i : i + c])
                                                for i in range(0, n, c)])
                for c in sorted({*per_call, default})}  # fmt: skip
        with torch.no_grad():
            rows[per_call[0]]()
            times, _ = interleaved_times(rows, rounds, n, lambda out: None)
        ms = {c: statistics.median(t) for c, t in times.items()}
        best = min(ms, key=ms.get)
        cells = ", ".join(f"**{c}: {t:.2f}**" if c == best else f"{c}: {t:.2f}"
                          for c, t in ms.items())  # fmt: skip
        lines.append(f"| {size[0]} x {size[1]} | {n} | {cells} |")
    return lines


def local_match_kernel(pairs: int, rounds: int) -> list[str]:
    """The default one-shot with the local window match on its kernel (what ``load_model``
    gives) against the same model with the plain torch ``LocalMatch``."""
    path = zoo.WEIGHTS_DIR / f"{zoo.default_weights()}.ckpt"
    regs = {"kernel": air_reg.load_model(path), "torch": air_reg.load_model(path)}
    regs["torch"].net.local_match = LocalMatch()  # the model as written, before accelerate
    lines = ["", f"One-shot (`Registrar.one_shot`), {pairs} pairs a family in one call, the "
             "local window match on its kernel (`speed.local_match`, the default) or the "
             "torch ops:", "",
             "| family | kernel, ms/pair | torch ops, ms/pair | ratio | max flow difference, px |"
             , "|---|---|---|---|---|"]  # fmt: skip
    return lines + one_shot_ab(
        lambda f, m: {k: (lambda r=r: r.one_shot(f, m)) for k, r in regs.items()},
        pairs, rounds, "the kernel",
    )  # fmt: skip


def lower_resolution(reg, pairs: int, rounds: int) -> list[str]:
    """The default one-shot on the families' pairs resized to 3/4 and 1/2 (antialiased), its
    flow resized back (``resize_flow``): EPE against the true field at full size, ms a pair."""
    scales = (1.0, 0.75, 0.5)
    lines = ["", f"One-shot on the pairs shrunk by a factor (antialiased), the flow brought back "
             f"to {families.SIZE[0]} x {families.SIZE[1]}, {pairs} pairs a family in one call: "
             "EPE px (worst pair) and ms a pair (the affine stage runs only on images of "
             f"{PREALIGN_MIN_SIDE} px a side or more: not at 1/2, nor at 3/4):", "",
             "| family | " + " | ".join(f"x {s:g}" for s in scales) + " |",
             "|---" * (len(scales) + 1) + "|"]  # fmt: skip

    def at(f, m, scale):
        if scale == 1:
            return reg.one_shot(f, m)
        size = tuple(round(n * scale) for n in f.shape[2:])
        small = [F.interpolate(x, size=size, mode="bilinear", antialias=True) for x in (f, m)]
        return resize_flow(reg.one_shot(*small), tuple(f.shape[2:]))

    def rows_of(f, m):
        return {s: (lambda s=s: at(f, m, s)) for s in scales}

    for name, batch, times, flows in per_family(rows_of, pairs, rounds):
        epes = {s: metrics.epe(flow, batch["flow"]) for s, flow in flows.items()}
        ms = {s: statistics.median(t) for s, t in times.items()}
        cells = [f"{epes[s].mean():.3f} ({epes[s].max():.2f}), {ms[s]:.0f} ms" for s in scales]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


LARGE = ((256, 256), (384, 384), (512, 512), (768, 768))  # 1,024 to 9,216 tokens at 1/8


def large_images(net, rounds: int) -> list[str]:
    """One pass of ``net`` on a random pair a size, the global match (and the propagation)
    in chunks of at most ``INFER_SCORES`` scores (the default) or of ``max_tokens``^2."""
    default = matching.INFER_SCORES
    lines = ["", "One pass of the network on one random pair, the global match and the "
             f"propagation in chunks of at most {default:,} scores (`matching.INFER_SCORES`, "
             f"the default) or of `max_tokens`^2 = {net.max_tokens**2:,} (before):", "",
             "| size | tokens at 1/8 | chunks of INFER_SCORES, ms | of max_tokens^2, ms | ratio "
             "| max flow difference, px |", "|---|---|---|---|---|---|"]  # fmt: skip

    def run(f, m, limit):
        with patched(matching, "INFER_SCORES", limit):
            return net(f, m)

    g = torch.Generator().manual_seed(0)
    for size in LARGE:
        f, m = torch.rand(2, 1, 1, *size, generator=g)
        rows = {k: (lambda limit=limit, f=f, m=m: run(f, m, limit))
                for k, limit in {"chunks": default, "before": 2**62}.items()}  # fmt: skip
        with torch.no_grad():
            for fn in rows.values():
                fn()  # warm-up
            times, flows = interleaved_times(rows, rounds, 1, lambda flow: flow)
        diff = (flows["chunks"] - flows["before"]).abs().max().item()
        if diff > 1e-3:
            raise SystemExit(f"{size}: the chunks change the flows by {diff} px")
        a, b = (statistics.median(times[k]) for k in rows)
        tokens = math.prod(-(-n // net.multiple) for n in size)
        lines.append(f"| {size[0]} x {size[1]} | {tokens:,} | {a:.0f} | {b:.0f} | {b / a:.2f} | "
                     f"{diff:.1e} |")  # fmt: skip
    return lines


def one_shot_ab(rows_of, pairs: int, rounds: int, what: str) -> list[str]:
    """Table rows, a family each: two ways of the same one-shot on the family's batch
    (``rows_of(fixed, moving)``: {name: call}, the default first), interleaved: ms a pair,
    the ratio and the largest flow difference (over 1e-3 px the run stops: ``what`` changed
    the flows)."""
    lines = []
    for name, _, times, flows in per_family(rows_of, pairs, rounds):
        a, b = flows
        diff = (flows[a] - flows[b]).abs().max().item()
        if diff > 1e-3:
            raise SystemExit(f"{name}: {what} changes the flows by {diff} px")
        ta, tb = (statistics.median(times[k]) for k in (a, b))
        lines.append(f"| {name} | {ta:.1f} | {tb:.1f} | {tb / ta:.2f} | {diff:.1e} |")
    return lines


def per_family(rows_of, pairs: int, rounds: int):
    """For each held-out family: (name, its batch of ``pairs``, {row: ms a pair per round},
    {row: its last flow}), the rows (``rows_of(fixed, moving)``: {row: call}) warmed up once
    and then timed interleaved, without gradients."""
    for name in families.FAMILIES:
        batch = families.family(name, pairs, split="test")[0]
        rows = rows_of(batch["fixed"], batch["moving"])
        with torch.no_grad():
            for fn in rows.values():
                fn()  # warm-up
            times, flows = interleaved_times(rows, rounds, pairs, lambda flow: flow)
        yield name, batch, times, flows


TABLES = ("encode", "calls", "call_sizes", "local", "resolution", "large")

if __name__ == "__main__":
    main()
