"""The paper's Table 1 and Fig. 3, reproduced: train every method of ``air_reg.zoo`` on a
dataset, then score them beside the identity, Demons and ANTs SyN on the benchmark pairs.

``experiments/reproduce.py`` is its command line; docs/protocol.md ("Reproduction protocol")
says what each profile and option changes.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import air_reg
from air_reg import zoo
from air_reg.bench.pairs import PAIRINGS, benchmark_batches, known_deformation_batches
from air_reg.bench.tables import seed_table, write_tables
from air_reg.bench.training import Budget, export, train_for
from air_reg.classical import ants_syn, demons
from air_reg.scoring import identity_method, score, summarise
from air_reg.viz import method_figure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """A training budget per model (DD:HH:MM:SS) and the pairs counted per pairing mode."""

    max_time: str
    test_pairs: int
    val_pairs: int
    pairs_per_epoch: int


PROFILES = {
    "quick": Profile("00:00:00:45", 200, 200, 1024),
    "smoke": Profile("00:00:00:08", 16, 32, 256),
    # the full budget, fewer test pairs: ANTs SyN takes ~0.3 s a pair
    "peers": Profile("00:00:05:00", 500, 1000, 4096),
    "full": Profile("00:00:05:00", 1000, 1000, 4096),
}


@dataclass(frozen=True)
class Plan:
    """What one reproduction trains and scores (the command line's choices)."""

    methods: tuple[str, ...]  # zoo labels
    profile: Profile
    budget: Budget  # the profile's time, or --max-steps
    train_pairing: str = "same_class"
    seeds: tuple[int, ...] | None = None  # None: the config's seed, rows named by the method
    refine: int = 0  # > 0: each learned model also with this many refinement steps
    ship: tuple[str, ...] | None = None  # export these methods' weights (() = all)
    demons: bool = True
    ants: bool = True


def train_method(method: zoo.Method, data: str, plan: Plan, run: Path, seed: int | None) -> Path:
    """Train one method on ``data``'s ``plan.train_pairing`` pairs for the plan's budget."""
    p = plan.profile
    overrides = [
        f"data.pairing={plan.train_pairing}",
        f"data.num_val_pairs={p.val_pairs}",
        f"data.pairs_per_epoch={p.pairs_per_epoch}",
        "trainer.max_epochs=1000",
        *([] if seed is None else [f"seed={seed}"]),
    ]
    return train_for(method.experiment, data, plan.budget, run, overrides)


def reproduce_dataset(data: str, plan: Plan, out: Path) -> list[str]:
    """Train the plan's methods on ``data``, score them on the random, same-class and known
    test pairs; write the tables and Fig. 3 to ``out``; return the report's sections."""
    models, groups, in_figure = {}, {}, set()
    # seed by seed, the methods interleaved: a change of load hits them alike
    for seed, label in [(s, m) for s in plan.seeds or [None] for m in plan.methods]:
        method = zoo.method(label)
        name = label if seed is None else f"{label} seed {seed}"
        run = out / "runs" / data / (method.experiment + ("" if seed is None else f"_{seed}"))
        if run.exists():
            shutil.rmtree(run)
        ckpt = train_method(method, data, plan, run, seed)
        rows = {label: (name, air_reg.load_model(ckpt))}  # table label: (row, model)
        if plan.refine:
            tail = f" + refine {plan.refine}"
            rows[label + tail] = (name + tail, air_reg.load_model(ckpt, refine_steps=plan.refine))
        for key, (row, model) in rows.items():
            models[row] = model
            groups.setdefault(key, []).append(row)
            if seed is None or seed == plan.seeds[0]:
                in_figure.add(row)
        if plan.ship is not None and label in (plan.ship or plan.methods):
            export(ckpt, method.weights_path(data))
    n = plan.profile.test_pairs
    test_sets = {p: benchmark_batches(data, p, n) for p in PAIRINGS}
    test_sets["known"] = known_deformation_batches(test_sets["same_class"])
    report = []
    for pairing, batches in test_sets.items():
        methods = {"Original": identity_method, **models}
        if plan.demons:
            methods["Demons"] = demons
        if plan.ants:
            methods["ANTs SyN"] = ants_syn
        per_pair, ms = score(methods, batches)
        tag = f"{data}_{pairing}"
        report += [f"\n## {data}, {pairing} test pairs\n", write_tables(out, tag, per_pair, ms)]
        if plan.seeds and len(plan.seeds) > 1:
            seeds = seed_table(summarise(per_pair), groups)
            (out / f"seeds_{tag}.md").write_text(seeds)
            report += [f"\n### over seeds {' '.join(map(str, plan.seeds))}\n", seeds]
        if pairing == "random":
            first = batches[0]
            f6, m6 = first["fixed"][:6], first["moving"][:6]
            flows = {name: m(f6, m6) for name, m in models.items() if name in in_figure}
            if plan.demons:
                flows["Demons"] = demons(f6, m6)
            method_figure(first["fixed"], first["moving"], flows, out / f"fig3_{data}.png")
    return report
