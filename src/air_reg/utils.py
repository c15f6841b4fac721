"""Small helpers shared by the entry points: run records, atomic file writes, error reports."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from air_reg.errors import ConfigError, OutputError, UserError

log = logging.getLogger(__name__)


def _file_mode() -> int:
    """What ``open`` would give a new file: mkstemp makes 0600 files, we follow the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; skipped where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's process; leave its file alone
        pass
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers of ``path`` (``save_torch``) left
    behind: those whose process is gone. A live writer's file is kept."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def save_torch(path: str | Path, obj) -> None:
    """``torch.save(obj, path)``, atomic and durable: a kill or power cut at any moment leaves
    the old file or the new one.

    Writes ``.<name>.<pid>.<random>.tmp`` beside ``path``, flushes and fsyncs it, renames it
    onto ``path`` (``os.replace``) and fsyncs the folder. A failed write removes its
    temporary file; one left by a killed process is removed by the next save to ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    prefix = f".{path.name}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and fail clearly when nothing can be written there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputError(
            f"output folder {folder} is not writable ({err.strerror}); choose another with "
            f"hydra.run.dir=... or paths.output_dir=..."
        ) from err
    return folder


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_record(cfg: DictConfig, extra: dict | None = None) -> dict:
    """What a run needs to be reproduced: config, versions, commit, data checksums."""
    from air_reg._version import __version__

    return {
        "air_reg_version": __version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **(extra or {}),
    }


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _frames(err: BaseException) -> list[tuple[str, str]]:
    """(file, function) of each frame from where ``err`` was caught to where it was raised."""
    out, tb = [], err.__traceback__
    while tb is not None:
        out.append((tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    return out


def _config_not_buildable(err: BaseException) -> bool:
    """Whether Hydra's ``instantiate`` failed before any code of the target ran: an unknown
    ``_target_``, or an unknown or missing argument. That is the config, not a bug."""
    import importlib

    import hydra

    machinery = (str(Path(hydra.__file__).parent), str(Path(importlib.__file__).parent), "<frozen")
    module_init = str(Path(torch.nn.Module.__init__.__code__.co_filename)), "__init__"
    chain, cause = [], err.__cause__
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for e in chain:
        ran = [f for f in _frames(e) if not f[0].startswith(machinery)]
        # nn.Module.__init__ refuses unknown arguments itself, as a TypeError
        if ran and not (isinstance(e, TypeError) and ran == [module_init]):
            return False
    return True


def user_error(err: BaseException) -> BaseException | None:
    """The error to show the user as one line, or None when ``err`` looks like a bug.

    That is one of air-reg's own ``UserError``s, also when Hydra's ``instantiate`` wraps one
    raised by a constructor; a mandatory setting (``???``) left unset; or a config that
    Hydra could not turn into an object at all. The last two become ``ConfigError``s.
    """
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(err, UserError):
        return err
    if isinstance(err, MissingMandatoryValue):  # a ``???`` in the config: the user must set it
        return ConfigError(f"{err.full_key} has no value: set {err.full_key}=...")
    if not isinstance(err, InstantiationException):
        return None
    if isinstance(err.__cause__, UserError | InstantiationException | MissingMandatoryValue):
        return user_error(err.__cause__)
    if not _config_not_buildable(err):
        return None
    message = str(err).replace(", set env var HYDRA_FULL_ERROR=1 to see chained exception.", "")
    if err.__cause__ is not None and str(err.__cause__) not in message:
        message += f": {err.__cause__}"  # e.g. why the _target_ could not be imported
    return ConfigError(message)


def bug_report_line() -> str:
    from air_reg._version import __version__

    return (
        "this looks like a bug in air-reg, not in your input: please report it with the "
        f"traceback above (air-reg {__version__}, torch {torch.__version__})"
    )


def run_cli(fn: Callable, cfg: DictConfig):
    """Call an entry point; exit with status 1 on an error.

    A ``UserError`` (bad input, files or settings: its message names the fix) is shown as one
    line; anything else is a bug and keeps its traceback, followed by a request to report it.
    ``AIR_REG_DEBUG=1`` re-raises every error unchanged.
    """
    try:
        return fn(cfg)
    except Exception as err:
        if os.environ.get("AIR_REG_DEBUG"):
            raise
        shown = user_error(err)
        if shown is None:
            log.error("Unexpected %s:", type(err).__name__, exc_info=err)
            log.error("%s", bug_report_line())
        else:
            message = " ".join(str(shown).split()) or repr(shown)
            name = type(shown).__name__
            log.error("%s: %s (set AIR_REG_DEBUG=1 for the traceback)", name, message)
        raise SystemExit(1) from None
