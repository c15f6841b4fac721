"""Small helpers shared by the entry points: run records and atomic file writes."""

from __future__ import annotations

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

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; follow the umask instead
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


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and fail clearly when nothing can be written there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(
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
    from air_reg import __version__

    return {
        "air_reg_version": __version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **(extra or {}),
    }


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# Errors whose message already tells the user what went wrong and how to fix it: the entry
# points print that message alone instead of a stack trace.
USER_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,  # ContractError: a network that lacks what the contract asks for
    FileNotFoundError,
    PermissionError,
    ValueError,
    RuntimeError,
)


def run_cli(fn: Callable, cfg: DictConfig):
    """Call an entry point; report a user error as one clear line and exit with status 1."""
    from hydra.errors import InstantiationException

    try:
        return fn(cfg)
    except (InstantiationException, *USER_ERRORS) as err:
        if os.environ.get("AIR_REG_DEBUG"):
            raise
        cause = err.__cause__ if isinstance(err, InstantiationException) else None
        shown = cause or err  # Hydra wraps the real error raised by the constructor
        message = " ".join(str(shown).split()) or repr(shown)
        log.error("%s: %s (set AIR_REG_DEBUG=1 for the traceback)", type(shown).__name__, message)
        raise SystemExit(1) from None
