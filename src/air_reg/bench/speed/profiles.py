"""What one speed-benchmark run measures: the ``full``, ``quick`` and ``smoke`` profiles."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """What one run measures; the defaults are the full run."""

    batch: int = 64  # training pairs per step
    infer_batch: int = 256  # pairs per batched inference call
    repeats: int = 7  # timed rounds after the warm-up
    warmup: int = 1  # untimed calls of every configuration first
    scaling: tuple[tuple[int, int], ...] = ((28, 7), (32, 4), (64, 4), (64, 2), (128, 2))
    scaling_batch: int = 8  # (image size, patch size) pairs above
    scaling_naive: bool = True  # also the naive reference (a child process per point)
    demons_pairs: int = 16
    demons_iterations: int = 100
    models: tuple[str, ...] | None = None  # sections 1-2; None: all
    memory_models: tuple[str, ...] | None = None  # section 3, a child process each; None: all
    policy_rounds: int = 2  # OMP_WAIT_POLICY lever: alternations of two child processes
    compile: bool = True
    profile_steps: int = 3
    # section 3b, training at larger images: (side, AiR-single patch, MAPT patches, batch).
    # Patches grow with the side, so AiR-single keeps 196-256 tokens and the rows compare
    # per-pixel costs; the last point (1,024 tokens at 128) shows what finer patches cost.
    sizes: tuple[tuple[int, int, tuple[int, ...], int], ...] = (
        (28, 2, (2, 4, 7), 64),
        (128, 8, (8, 16, 32), 64),
        (256, 16, (16, 32, 64), 64),
        (128, 4, (4, 8, 16), 16),
    )
    size_models: tuple[str, ...] = ("AiR-single", "MAPT")


AIR_ROWS = ("AiR-single p2 ours", "AiR-single p2 naive, matched widths")
PROFILES = {
    "full": Profile(),  # <= ~10 minutes on 2 CPU cores
    "quick": Profile(  # about a minute
        batch=16,
        infer_batch=64,
        repeats=2,
        scaling=((28, 7), (64, 4)),
        scaling_batch=4,
        demons_pairs=4,
        memory_models=AIR_ROWS,
        policy_rounds=1,
        compile=False,
        sizes=((28, 2, (2, 4, 7), 16), (128, 8, (8, 16, 32), 16), (256, 16, (16, 32, 64), 16)),
    ),
    # For the tests: every code path in seconds, numbers meaningless.
    "smoke": Profile(
        batch=2,
        infer_batch=4,
        repeats=1,
        warmup=0,
        scaling=((28, 7),),
        scaling_batch=2,
        scaling_naive=False,
        demons_pairs=2,
        demons_iterations=5,
        models=AIR_ROWS,
        memory_models=(),
        policy_rounds=0,
        compile=False,
        profile_steps=1,
        sizes=((28, 7, (7,), 2),),  # one tiny point
        size_models=("AiR-single",),
    ),
}
MAX_MB, MAX_STEP_S = 8000, 60  # skip a scaling point whose extrapolated cost exceeds either
