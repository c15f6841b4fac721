"""The entry points show air-reg's own errors (bad input or settings) as one line; any other
exception is a bug: its traceback is kept, with a line asking for a report."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from air_reg import CheckpointError, __version__
from air_reg.data.idx import IdxFileError
from air_reg.errors import ConfigError, DataError, OutputError, UserError
from air_reg.images import ImageError
from air_reg.models.contract import ContractError
from air_reg.models.registration_module import NonFiniteLossError
from air_reg.refine import RefineSettingsError
from air_reg.speed.kernels import KernelUnavailable
from air_reg.utils import run_cli

BUG_LINE = "this looks like a bug in air-reg, not in your input: please report it"


def _fails(exc: BaseException):
    def fn(cfg):
        raise exc

    return fn


def _run(fn, caplog) -> list[logging.LogRecord]:
    """``run_cli(fn)``: it must exit with status 1; the records it logged."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="air_reg.utils"), pytest.raises(SystemExit) as ex:
        run_cli(fn, OmegaConf.create({}))
    assert ex.value.code == 1
    return [r for r in caplog.records if r.name == "air_reg.utils"]


USER_ERRORS = [
    ConfigError("data.pairing must be one of ('random',), got 'x'"),
    DataError("mnist data missing: put the files in data/MNIST/raw/"),
    OutputError("output folder /x is not writable (Permission denied)"),
    IdxFileError("/x.gz is corrupt or truncated; replace it"),
    ImageError("a.png does not exist; check the path"),
    CheckpointError("none.ckpt does not exist"),
    ContractError("a registration network must be a torch.nn.Module"),
    NonFiniteLossError("training loss is nan at step 3; lower model.optimizer.lr"),
    KernelUnavailable("no C++ compiler found: install g++ or set speed.attention=sdpa"),
    RefineSettingsError("refine.*: got an unexpected keyword argument 'foo'"),
]


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: type(e).__name__)
def test_user_errors_are_one_line(caplog, error):
    assert isinstance(error, UserError)
    (record,) = _run(_fails(error), caplog)
    assert record.getMessage() == (
        f"{type(error).__name__}: {error} (set AIR_REG_DEBUG=1 for the traceback)"
    )
    assert record.exc_info is None
    assert "Traceback" not in caplog.text
    assert BUG_LINE not in caplog.text


@pytest.mark.parametrize(
    "error",
    [ValueError("shapes disagree"), RuntimeError("size mismatch"), KeyError("state_dict")],
    ids=lambda e: type(e).__name__,
)
def test_other_errors_keep_the_traceback_and_ask_for_a_report(caplog, error):
    first, last = _run(_fails(error), caplog)
    assert first.exc_info is not None
    assert first.exc_info[1] is error
    assert "Traceback (most recent call last)" in caplog.text
    assert f"{type(error).__name__}: {error}" in caplog.text  # the traceback's last line
    assert last.getMessage().startswith(BUG_LINE)
    assert f"air-reg {__version__}, torch {torch.__version__}" in last.getMessage()


class Buggy:
    """A constructor with a bug in it (not a bad argument)."""

    def __init__(self, size: int = 2) -> None:
        torch.zeros(size).view(3)  # RuntimeError: shape '[3]' is invalid


def _instantiating(config: dict):
    return lambda cfg: instantiate(OmegaConf.create(config))


HYDRA_CASES = [  # (config, one line expected?, fragment of the output)
    ({"_target_": "air_reg.losses.LocalNCC", "window": 4}, True,
     "ConfigError: window must be a positive odd integer, got 4"),
    ({"_target_": "air_reg.models.components.air.AiR", "foo": 1}, True,
     "ConfigError: AiR has no setting(s) ['foo']"),
    ({"_target_": "air_reg.losses.MSE", "bar": 1}, True, "unexpected keyword argument 'bar'"),
    ({"_target_": "air_reg.losses.Nope"}, True, "ConfigError: Error locating target"),
    ({"_target_": "air_reg.losses.MSE", "x": "???"}, True,
     "ConfigError: x has no value: set x=..."),
    ({"_target_": f"{__name__}.Buggy"}, False, "shape '[3]' is invalid"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "one_line", "fragment"), HYDRA_CASES)
def test_errors_through_hydra_instantiate(caplog, config, one_line, fragment):
    records = _run(_instantiating(config), caplog)
    assert fragment in caplog.text
    if one_line:
        assert len(records) == 1
        assert "Traceback" not in caplog.text
    else:
        assert "Traceback" in caplog.text
        assert records[-1].getMessage().startswith(BUG_LINE)


def test_debug_setting_re_raises(monkeypatch):
    monkeypatch.setenv("AIR_REG_DEBUG", "1")
    with pytest.raises(ConfigError, match="pairing"):
        run_cli(_fails(ConfigError("data.pairing")), OmegaConf.create({}))
    with pytest.raises(RuntimeError, match="boom"):
        run_cli(_fails(RuntimeError("boom")), OmegaConf.create({}))


def _train(tmp_path, *overrides, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m air_reg.train data=synthetic ...`` (after ``code``, when given)."""
    args = ["data=synthetic", f"hydra.run.dir={tmp_path}", *overrides]
    if code is None:
        cmd = [sys.executable, "-m", "air_reg.train", *args]
    else:
        script = tmp_path / "run.py"
        script.write_text(
            textwrap.dedent(code) + f"\nsys.argv = ['train', *{args!r}]\ntrain.main()\n"
        )
        cmd = [sys.executable, str(script)]
    return subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )


@pytest.mark.slow
def test_train_cli_bad_setting_is_one_line(tmp_path):
    out = _train(tmp_path, "data.pairing=nope")
    assert out.returncode == 1, out.stdout
    assert "ConfigError: data.pairing must be one of" in out.stdout
    assert "(set AIR_REG_DEBUG=1 for the traceback)" in out.stdout
    assert "Traceback" not in out.stdout
    assert BUG_LINE not in out.stdout


@pytest.mark.slow
def test_train_cli_bug_keeps_the_traceback(tmp_path):
    bug = """
        import sys
        from air_reg import speed, train

        def settings_of(cfg):
            raise RuntimeError("an internal invariant broke")

        speed.settings_of = settings_of  # a bug in air-reg's own code
    """
    out = _train(tmp_path, code=bug)
    assert out.returncode == 1, out.stdout
    assert "Traceback (most recent call last)" in out.stdout
    assert "RuntimeError: an internal invariant broke" in out.stdout
    assert BUG_LINE in out.stdout
    assert out.stdout.index("Traceback") < out.stdout.index(BUG_LINE)
