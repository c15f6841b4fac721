"""Building and caching air-reg's C++ CPU kernels (attention and dropout), and their failures."""

import pytest

from air_reg.models.components import kernels

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason="no C++ compiler here: the kernels cannot be built"
)


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
