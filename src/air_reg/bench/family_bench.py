"""The benchmark over the 2-D families (``experiments/refine_families.py``): identity, model-free
refinement (MSE, mutual information, with an affine stage), ANTs SyN (with and without its
affine stage) and SimpleITK Demons on the same pairs of ``air_reg.bench.families``, pair by
pair, the method order rotating every pair (the host is shared and noisy).

Scores per pair and method: ``epe`` (px, mean over every pixel), ``epe_edges`` (over the pixels
of the batch's ``edges`` mask: the fixed image's strongest 20 % gradients whose true target is
inside the moving image, where a registration can be judged), ``folding`` (% of pixels with
det J <= 0) and ``ms`` (the call, one pair, after one untimed warm-up call per method).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from air_reg import metrics as M
from air_reg.bench.families import FAMILIES, MNI, family
from air_reg.bench.tables import checkpoint_name
from air_reg.checkpoint import shipped_weights
from air_reg.classical import ants_syn, demons, has_ants, has_simpleitk
from air_reg.models.components.air_match import PREALIGN_STEPS, AiRMatch
from air_reg.refine.optimise import keep_if_better

log = logging.getLogger(__name__)
STEPS = 60  # refine_steps of the refined rows (the CLI preset's)
DEMONS = {"iterations": 100, "smoothing_sigma": 1.5}  # the brain benchmark's (air_reg.bench.brain)
MATTES = {"syn_metric": "mattes", "syn_sampling": 32}  # ANTs' Mattes MI, 32 bins
# --methods key -> the row's label ({steps}: refine_steps)
LABELS = {
    "identity": "identity",
    "refine": "refine {steps} (MSE, the default preset)",
    "refine_no_affine": "refine {steps}, affine_steps=0 (before 2026-12-06)",
    "refine_mi": "refine {steps}, similarity=mi",
    "refine_affine": "refine {steps}, affine_steps=100 always",
    "refine_auto_affine": "refine {steps}, affine_steps=10 kept > 5 px",
    "syn": "ANTs SyNOnly",
    "syn_affine": "ANTs SyN (affine + SyN)",
    "demons": "SimpleITK Demons",
}
FAST = ("identity", "refine", "demons")  # the smoke test's
# Learned models (issue #32): "net:<source>" one-shot (as the network asks to be applied: its
# default cascade and pre-alignment), "net+refine:<source>" refined from it,
# "net+cascade:<source>" one-shot after a 15-step MI affine stage, in up to 6 passes with the
# affine fit between them, a pair stopping once a pass moved it less than 0.25 px (AiR-Match's
# defaults, for any network: the ablations at the same inference);
# <source> a shipped weights name or a checkpoint path.
NET, NET_REFINE, NET_CASCADE = "net", "net+refine", "net+cascade"
CASCADE = {**dict(zip(("cascade", "cascade_affine", "cascade_tol"), AiRMatch.default_cascade,
                      strict=True)), "prealign": PREALIGN_STEPS}  # NET_CASCADE's  # fmt: skip
FIELDS = ("family", "pair", "source", "contrast", "method", "label", "epe", "epe_edges",
          "folding", "ms")  # fmt: skip


def make_method(key: str, family_name: str, steps: int = STEPS) -> Callable | None:
    """``(fixed, moving) -> flow`` for (1, 1, H, W) pairs, or None when its package is
    missing. ANTs uses Mattes mutual information (32 bins) on the contrast family, its
    cross-correlation defaults elsewhere; its affine stage is Mattes MI in both (antspyx's)."""
    import air_reg  # the public API, as a user calls it

    if key == "identity":
        return lambda f, m: torch.zeros(len(f), 2, *f.shape[-2:])
    kind, _, source = key.partition(":")
    if kind in (NET, NET_REFINE, NET_CASCADE) and source:
        path = _checkpoint(source)
        if kind in (NET, NET_CASCADE):  # as register runs it: any-size nets at the pair's
            # size, others resized; the guard judging by its similarity
            model = air_reg.load_model(path, **(CASCADE if kind == NET_CASCADE else {}))
            return lambda f, m: keep_if_better(model.one_shot(f, m), f, m,
                                               model.guard_similarity)[0]  # fmt: skip
        # refined by MI on the contrast family (as ANTs is, and as docs/zero_shot.md says)
        similarity = "mi" if family_name == "contrast" else "mse"
        return air_reg.load_model(path, refine_steps=steps, similarity=similarity)
    if key == "refine":
        return air_reg.load_model(None, refine_steps=steps)
    if key == "refine_mi":
        settings = air_reg.RefineSettings.preset("default", steps=steps, similarity="mi")
        return air_reg.Registrar(None, settings)
    if key == "refine_no_affine":  # the default preset before its affine stage (#31)
        return air_reg.load_model(None, refine_steps=steps, affine_steps=0)
    if key == "refine_affine":
        return air_reg.load_model(None, refine_steps=steps, affine_steps=100, affine_min_px=0.0)
    if key == "refine_auto_affine":  # the affine only where it moves a pixel > 5 px (#31)
        return air_reg.load_model(None, refine_steps=steps, affine_steps=10, affine_min_px=5.0)
    if key in ("syn", "syn_affine"):
        if not has_ants():
            return None
        extra = MATTES if family_name == "contrast" else {}
        transform = "SyN" if key == "syn_affine" else "SyNOnly"
        return lambda f, m: ants_syn(f, m, transform=transform, **extra)
    if key == "demons":
        return (lambda f, m: demons(f, m, **DEMONS)) if has_simpleitk() else None
    raise ValueError(f"unknown method {key!r}; choose from {sorted(LABELS)}")


def label_of(key: str, steps: int = STEPS) -> str:
    """A row's label: ``LABELS``' for the fixed methods; a model's name and how it ran."""
    kind, _, source = key.partition(":")
    if kind in (NET, NET_REFINE, NET_CASCADE) and source:
        name = checkpoint_name(source)
        return {NET: f"{name} one-shot", NET_CASCADE: f"{name} one-shot, <= 6 passes + affine",
                NET_REFINE: f"{name} + refine {steps} (MI on contrast)"}[kind]  # fmt: skip
    return LABELS[key].format(steps=steps)


def _checkpoint(source: str):
    return Path(source) if source.endswith(".ckpt") else shipped_weights(source)


def score(flow: torch.Tensor, target: torch.Tensor, edges: torch.Tensor) -> dict:
    """One pair's scores: flow, target (1, 2, H, W), edges (1, 1, H, W) bool."""
    return {
        "epe": M.epe(flow, target).item(),
        "epe_edges": M.epe(flow, target, edges).item(),  # NaN without an edge pixel
        "folding": M.folding(flow).item(),
    }


def run(
    families: list[str],
    n: int,
    size: tuple[int, int],
    split: str,
    methods: list[str],
    *,
    seed: int = 0,
    steps: int = STEPS,
    sink: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every method on the first ``n`` pairs of each family: one row (``FIELDS``) per (pair,
    method); ``sink`` gets each pair's rows as they come (a run cut short keeps them)."""
    rows, turn = [], 0
    for name in families:
        batch = family(name, n, size, seed, split=split)[0]
        fns = {k: make_method(k, name, steps) for k in methods}
        for k in [k for k, fn in fns.items() if fn is None]:
            log.warning("%s: its package is missing, row left out", k)
            del fns[k]
        for fn in fns.values():  # warm-up: kernel builds, ITK's threads, first calls
            fn(batch["fixed"][:1], batch["moving"][:1])
        for i in range(n):
            one = {k: batch[k][i : i + 1] for k in ("fixed", "moving", "flow", "edges")}
            timed = timed_pair(fns, one["fixed"], one["moving"], turn)
            turn += 1
            for k, (flow, ms) in timed.items():
                rows.append({
                    "family": name, "pair": i, "source": batch["source"][i],
                    "contrast": batch["contrast"][i], "method": k,
                    "label": label_of(k, steps),
                    **score(flow, one["flow"], one["edges"]), "ms": ms,
                })  # fmt: skip
            if sink is not None:
                sink(rows[-len(timed) :])
            log.info("%s pair %d (%s): %s", name, i, batch["source"][i],
                     {r["method"]: round(r["epe"], 2) for r in rows[-len(timed):]})  # fmt: skip
    return rows


def timed_pair(
    fns: dict[str, Callable], fixed: torch.Tensor, moving: torch.Tensor, turn: int
) -> dict[str, tuple[torch.Tensor, float]]:
    """Each of ``fns`` (``fn(fixed, moving) -> flow``) on one pair without gradients, in an
    order rotated by ``turn`` (the host is shared and noisy: no method always runs first):
    ``{key: (flow, ms)}``, the keys in the order they ran."""
    keys = list(fns)[turn % len(fns) :] + list(fns)[: turn % len(fns)]
    out = {}
    for k in keys:
        tic = time.perf_counter()
        with torch.no_grad():
            flow = fns[k](fixed, moving).detach()
        out[k] = (flow, 1000 * (time.perf_counter() - tic))
    return out


def timed_scores(fns: dict[str, Callable], batch: dict) -> dict[str, dict[str, list[float]]]:
    """Each of ``fns`` on every pair of ``batch`` (keys fixed, moving, flow, edges), one pair a
    call after one untimed warm-up call each, the order rotating pair by pair (``timed_pair``):
    ``{key: {"epe": [...], "epe_edges": [...], "folding": [...], "ms": [...]}}``, one value
    a pair."""
    for fn in fns.values():
        with torch.no_grad():
            fn(batch["fixed"][:1], batch["moving"][:1])
    out = {k: {"epe": [], "epe_edges": [], "folding": [], "ms": []} for k in fns}
    for i in range(len(batch["fixed"])):
        one = {k: batch[k][i : i + 1] for k in ("fixed", "moving", "flow", "edges")}
        for k, (flow, ms) in timed_pair(fns, one["fixed"], one["moving"], i).items():
            for name, value in {**score(flow, one["flow"], one["edges"]), "ms": ms}.items():
                out[k][name].append(value)
    return out


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]  # NaN (no edge pixel) left out
    return sum(values) / len(values) if values else float("nan")


def tables(rows: list[dict]) -> str:
    """Markdown: EPE (all pixels) methods x families with ms per pair; then per family and
    method EPE on edges, on MNI152 and on scikit-image pairs, folding and ms."""
    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    label = {r["method"]: r["label"] for r in rows}
    pick = lambda f, m: [r for r in rows if r["family"] == f and r["method"] == m]  # noqa: E731
    head = " | ".join(f"{f} EPE" for f in families)
    lines = [f"| method | {head} | ms/pair (median, all pairs) |",
             "|---" * (len(families) + 2) + "|"]  # fmt: skip
    for m in methods:
        cells = [f"{_mean([r['epe'] for r in pick(f, m)]):.3f}" for f in families]
        ms = statistics.median(r["ms"] for r in rows if r["method"] == m)
        lines.append(f"| {label[m]} | " + " | ".join(cells) + f" | {ms:.0f} |")
    lines += ["", "| family | method | EPE | EPE edges | EPE MNI152 | EPE scikit-image | "
              "folding % | ms/pair (median) | pairs |", "|---" * 9 + "|"]  # fmt: skip
    for f in families:
        for m in methods:
            p = pick(f, m)
            mni = [r["epe"] for r in p if r["source"].startswith(MNI)]
            ski = [r["epe"] for r in p if not r["source"].startswith(MNI)]
            lines.append(
                f"| {f} | {label[m]} | {_mean([r['epe'] for r in p]):.3f} | "
                f"{_mean([r['epe_edges'] for r in p]):.3f} | {_mean(mni):.3f} | "
                f"{_mean(ski):.3f} | {_mean([r['folding'] for r in p]):.3f} | "
                f"{statistics.median(r['ms'] for r in p):.0f} | {len(p)} |"
            )
    return "\n".join(lines) + "\n"


def batched(sources: list[str], families: list[str], n: int, size: tuple[int, int],
            split: str = "test", *, seed: int = 0, rounds: int = 3) -> str:  # fmt: skip
    """Markdown: each learned model one-shot on a family's ``n`` pairs in ONE call (as
    ``register`` runs a folder of one size), ms per pair (median of ``rounds``, the models
    interleaved) and EPE; ANTs and Demons have no batched mode, their per-pair times are in
    ``tables``."""
    from air_reg.bench.refinement import interleaved_times

    lines = ["| family | model | one-shot EPE, batched | ms/pair, batched |", "|---" * 4 + "|"]
    for name in families:
        batch = family(name, n, size, seed, split=split)[0]
        fns = {checkpoint_name(s): make_method(f"{NET}:{s}", name) for s in sources}
        f, m = batch["fixed"], batch["moving"]
        rows = {k: (lambda fn=fn, f=f, m=m: fn(f, m)) for k, fn in fns.items()}
        for fn in rows.values():
            fn()  # warm-up
        with torch.no_grad():
            times, flows = interleaved_times(rows, rounds, n, lambda flow: flow)
        for k in rows:
            epe = M.epe(flows[k], batch["flow"]).mean().item()
            lines.append(f"| {name} | {k} | {epe:.3f} | {statistics.median(times[k]):.1f} |")
    return "\n".join(lines) + "\n"
