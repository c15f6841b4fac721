"""The floor estimate of a refinement (air_reg.bench.floor): its bookkeeping, not the machine."""

from __future__ import annotations

from air_reg.bench.floor import Work, floor_ms, work
from air_reg.refine import RefineSettings


def test_work_walks_the_presets_pyramid_and_grows_with_the_image():
    preset = RefineSettings.preset("default", steps=60)
    small, mid, big = (work(s, preset) for s in ((28, 28), (233, 197), (512, 512)))
    assert small.steps == 60  # 28 x 28: one level (14 < min_size)
    assert mid.steps == big.steps == 60 * (3 + 2 + 1)  # coarse levels take more steps
    assert small.flops < mid.flops < big.flops
    assert small.bytes < mid.bytes < big.bytes
    fewer = work((233, 197), preset.replace(steps=30))
    assert abs(fewer.flops - mid.flops / 2) < 1e-6 * mid.flops


def test_the_floor_is_the_slower_of_computing_and_moving():
    w = Work(flops=2e9, bytes=1e9, steps=1)
    f = floor_ms(w, {"gflops": 100.0, "cache_gbs": 10.0, "dram_gbs": 5.0})
    assert f["compute_ms"] == 20.0
    assert f["memory_ms"] == 100.0
    assert f["floor_ms"] == 100.0
    assert (
        floor_ms(w, {"gflops": 100.0, "cache_gbs": 10.0, "dram_gbs": 5.0}, in_cache=False)[
            "memory_ms"
        ]
        == 200.0
    )
