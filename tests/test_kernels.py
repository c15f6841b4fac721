"""Building and caching air-reg's C++ CPU kernels (attention and dropout), and their failures."""

import pytest
import torch
from conftest import needs_kernel

from air_reg.speed import attention as cpu_attention
from air_reg.speed import dropout, kernels


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A private, empty kernel cache; afterwards the real build is loaded again."""
    monkeypatch.setenv("AIR_REG_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    kernels.library.cache_clear()


def test_build_failure_names_the_compiler_and_the_fix(own_cache, monkeypatch):
    monkeypatch.setenv("CXX", str(own_cache / "no-such-compiler"))
    with pytest.raises(kernels.KernelUnavailable, match="could not run"):
        kernels.library()


@needs_kernel
def test_unwritable_cache_names_the_setting_to_change(own_cache, monkeypatch):
    blocker = own_cache / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AIR_REG_CACHE", str(blocker))
    with pytest.raises(kernels.KernelUnavailable, match="AIR_REG_CACHE"):
        kernels.library()


@needs_kernel
@pytest.mark.slow
def test_kernel_builds_into_an_empty_cache_and_is_reused(own_cache):
    kernels.library()
    built = list((own_cache / "kernels").iterdir())
    assert len(built) == 1  # no temporary file left behind
    assert built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    kernels.library.cache_clear()
    kernels.library()
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


@needs_kernel
def test_without_openmp_the_shares_run_on_python_threads_with_the_same_results(monkeypatch):
    q, k, v = torch.randn(3, 2, 50, 16)  # (B, N, heads * d), 4 heads of 4
    x = torch.randn(4 * dropout._MIN_SHARE)

    def run():
        torch.manual_seed(1)
        return cpu_attention.attention(q, k, v, 4), dropout.FastDropout(0.5).train()(x)

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        expected = run()
        monkeypatch.setattr(kernels.library(), "openmp", False)  # as a build without -fopenmp
        monkeypatch.setattr(kernels, "_pool", None)
        got = run()
    finally:
        torch.set_num_threads(threads)
    assert kernels._pool[1] == 3  # the shares went to a pool of 3 Python threads
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
