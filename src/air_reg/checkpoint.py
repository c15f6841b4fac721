"""Rebuild a trained model from its checkpoint file alone, safely, without Lightning."""

from __future__ import annotations

import os
import pydoc
from contextlib import nullcontext
from itertools import chain
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn
from torch.overrides import TorchFunctionMode

from air_reg import deprecation, speed
from air_reg.errors import UserError
from air_reg.models import contract
from air_reg.refine import RefineSettings, Registrar
from air_reg.zoo import WEIGHTS_DIR

# A checkpoint's stored config may only name classes from these packages, and from the
# module prefixes listed in $AIR_REG_TRUST (comma-separated, e.g. "mylab.nets."): loading a
# checkpoint never runs code from elsewhere (tensors are read with ``weights_only=True`` too).
SAFE_TARGETS = ("air_reg.", "torch.optim.", "torch.nn.")
TRUST_ENV = "AIR_REG_TRUST"
# Speed settings that older checkpoints stored in the network's config (now ``speed.*``).
LEGACY_NET_KEYS = ("impl", "fast_dropout", "attn_kernel")
# Network settings renamed since a checkpoint may have been written: {class: {old: new}}.
RENAMED_NET_KEYS = {"air_reg.models.components.mapt.MAPT": {"weights": "mix_weights"}}
TRAINED = "use a .ckpt written by `python -m air_reg.train`"
MAX_DEPTH = 64  # how deep a stored config may nest (a corrupt one may nest forever or loop)
# Building a stored network config may make 8x its weights' values plus MAX_EXTRA; one with
# an int beyond SMALL_INT is first built on the meta device (shapes, no memory) and must fit
# its weights, plus at most MAX_EXTRA values of other buffers; one beyond MAX_INT (no
# network's setting: a corrupt one, which constructors may loop over) is refused unbuilt.
SMALL_INT, MAX_EXTRA, MAX_INT = 1024, 2**26, 2**20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, or not an air-reg model."""


def trusted_prefixes() -> tuple[str, ...]:
    """``SAFE_TARGETS`` and the prefixes named in ``$AIR_REG_TRUST``."""
    extra = os.environ.get(TRUST_ENV, "")
    return SAFE_TARGETS + tuple(p.strip() for p in extra.split(",") if p.strip())


def _check_targets(node, where: str) -> None:
    todo = [(node, where, 0)]  # a stack, not recursion: a corrupt config may nest or loop
    while todo:
        node, where, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise CheckpointError(
                f"the checkpoint's stored config nests deeper than {MAX_DEPTH} levels at "
                f"{where[:80]}... (corrupt, or a reference loop); {TRAINED}"
            )
        if isinstance(node, dict):
            _check_target(node.get("_target_"), where)
            todo += [(value, f"{where}.{key}", depth + 1) for key, value in node.items()]
        elif isinstance(node, list | tuple):
            todo += [(value, f"{where}[{i}]", depth + 1) for i, value in enumerate(node)]


def _check_target(target, where: str) -> None:
    if target is None:
        return
    if not isinstance(target, str):
        raise CheckpointError(
            f"the checkpoint's stored config is corrupt: its _target_ at {where} is of type "
            f"{type(target).__name__}, not a class name; {TRAINED}"
        )
    trusted = trusted_prefixes()
    if not target.startswith(trusted):
        module = target.rpartition(".")[0] or target
        raise CheckpointError(
            f"checkpoint config names {target!r} at {where}, outside the trusted "
            f"{', '.join(trusted)}, so it was not loaded. If you trust that code, name its "
            f"module in {TRUST_ENV} (e.g. export {TRUST_ENV}={module}.)"
        )


def _check_classes(node, where: str = "model.net") -> None:
    """Every ``_target_`` in the network config names an ``nn.Module`` class (or is a
    ``_partial_``): loading never calls a function, even one inside the trusted packages."""
    if isinstance(node, dict):
        if "_target_" in node and node.get("_partial_") is not True:
            try:
                obj = pydoc.locate(node["_target_"])  # imports its module, calls nothing
            except Exception:  # pydoc.ErrorDuringImport
                obj = None
            if obj is None:
                raise CheckpointError(
                    f"checkpoint config names {node['_target_']!r} at {where}, which cannot be "
                    f"imported here; {TRAINED} with this air-reg version"
                )
            if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
                raise CheckpointError(
                    f"checkpoint config names {node['_target_']!r} at {where}, which is not a "
                    f"torch.nn.Module class, so it was not called; {TRAINED}"
                )
        for key, value in node.items():
            _check_classes(value, f"{where}.{key}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _check_classes(value, f"{where}[{i}]")


def network_config(record: dict) -> tuple[dict, dict]:
    """The network's config from a checkpoint record, and the speed settings it trained with
    (older records kept ``impl``/``fast_dropout``/``attn_kernel`` in the network's config, and
    settings since renamed under their former names: ``RENAMED_NET_KEYS``)."""
    model = record.get("model")
    net_cfg = model.get("net") if isinstance(model, dict) else None
    if not isinstance(net_cfg, dict) or "_target_" not in net_cfg:
        raise CheckpointError(
            "the checkpoint's record has no network config (model.net); use a .ckpt written "
            "by `python -m air_reg.train`"
        )
    net_cfg = dict(net_cfg)
    for old, new in RENAMED_NET_KEYS.get(net_cfg["_target_"], {}).items():
        if old in net_cfg and new not in net_cfg:
            net_cfg[new] = net_cfg.pop(old)
    legacy = {k: net_cfg.pop(k) for k in LEGACY_NET_KEYS if k in net_cfg}
    if not all(v is None or isinstance(v, str | bool) for v in legacy.values()):
        raise CheckpointError(
            f"the checkpoint's stored network config is corrupt: {', '.join(legacy)} must be "
            f"strings or booleans; {TRAINED}"
        )
    if legacy.get("impl", "sdpa") != "sdpa":
        raise CheckpointError(
            f"this checkpoint was trained with the reference nn.Transformer (impl="
            f"{legacy['impl']!r}), which air-reg no longer builds; retrain it"
        )
    speed = record.get("speed")
    if not isinstance(speed, dict) or not speed:
        speed = {
            "attention": {"cpu": "kernel"}.get(legacy.get("attn_kernel"), "auto"),
            "dropout": "fast" if legacy.get("fast_dropout") else "torch",
        }
    return net_cfg, speed


def shipped_weights(name: str) -> Path:
    """``air_reg/weights/<name>.ckpt``; the error lists what is shipped."""
    path = WEIGHTS_DIR / f"{name}.ckpt"
    if not path.is_file():
        shipped = sorted(p.stem for p in WEIGHTS_DIR.glob("*.ckpt"))
        raise CheckpointError(
            f"no shipped weights {path.name}: choose weights=<name> among {shipped or 'none'} "
            f"or pass ckpt_path=<run dir>/checkpoints/last.ckpt (from `python -m air_reg.train`)"
        )
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, read with ``weights_only=True``; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass the path of a .ckpt written by "
            f"`python -m air_reg.train` (see <run dir>/checkpoints/)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own text suggests weights_only=False: not for us
        reason = "not a zip archive" if "zip" in str(err) else type(err).__name__
        raise CheckpointError(
            f"{path} could not be read as a safe checkpoint (corrupt, truncated, not a "
            f"PyTorch file, or holding pickled objects: {reason}); retrain or re-download it"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "air_reg" not in ckpt:
        raise CheckpointError(
            f"{path} is not an air-reg checkpoint (no model record); use a .ckpt written "
            f"by `python -m air_reg.train`"
        )
    state, record = ckpt["state_dict"], ckpt["air_reg"]
    if not (isinstance(state, dict) and isinstance(record, dict)) or not all(
        isinstance(key, str) for key in state
    ):
        raise CheckpointError(
            f"{path} is corrupt: its state_dict or model record is not a dict of named "
            f"entries; retrain or re-download it"
        )
    return ckpt


def load_model(
    path: str | Path | None,
    device: str | torch.device = "cpu",
    *,
    attention: str = "auto",
    refine_steps: int = 0,
    cascade: int | None = None,
    cascade_affine: bool | None = None,
    cascade_tol: float | None = None,
    prealign: int | None = None,
    preset: str | None = "default",
    **refine_overrides,
) -> Registrar:
    """Rebuild the network stored in ``path`` as a ``Registrar``, eval mode, on ``device``.

    ``model(fixed, moving)`` takes (B, 1, H, W) images in [0, 1] and returns the flow
    (B, 2, H, W) in pixels (channel 0 rows, channel 1 columns), on the fixed grid: the
    network's own flow, at its trained size (``model.image_size``). ``attention`` is the CLI's
    ``speed.attention`` (``air_reg.speed``). ``cascade`` (passes), ``cascade_affine`` (the
    flow reduced to its affine fit between passes) and ``cascade_tol`` (px: a pair stops once
    a pass moved it less) default to the network's own choice (``contract.default_cascade``:
    up to 6 passes with the affine and 0.25 px for AiR-Match, else 1). ``prealign`` (Adam
    steps of a mutual-information affine stage before a one-shot network, 0: none) defaults
    to the network's own (``contract.default_prealign``: 15 for a 2-D AiR-Match, else 0).
    ``refine_steps > 0`` (or ``affine_steps`` given here, or ``cascade > 1`` on a network of one
    size) makes it refine: it then takes pairs at their own size (``model.accepts_any_size``)
    and refines each pair's flow there with
    ``model.settings``: those of ``air_reg/conf/refinement/<preset>.yaml`` -- the CLI's for the
    same ``refine_steps`` -- unless ``refine_overrides`` (lr, spacing, levels, similarity, ...)
    say otherwise (``preset=None``: the overrides over ``RefineSettings()``). ``path=None``
    (or ``"none"``) is model-free registration: the refinement alone.
    """
    net, record = (None, None) if _model_free(path) else _load_network(Path(path), attention)
    cascade = _cascade(net, cascade, cascade_affine, cascade_tol, prealign)
    settings = None
    if _refines(net, refine_steps, cascade[0], refine_overrides.get("affine_steps")):
        overrides = {"steps": refine_steps, **refine_overrides}
        if preset is None:
            settings = RefineSettings.from_config(overrides)
        else:
            settings = RefineSettings.preset(preset, **overrides)
    return _registrar(net, record, device, settings, cascade)


def load_configured(path: str | Path | None, cfg):
    """``load_model`` with an entry point's device and refinement settings (eval, register):
    the composed ``cfg.refine`` goes through ``RefineSettings.from_config``, as a preset does."""
    attention = speed.settings_of(cfg)["attention"]
    net, record = (None, None) if _model_free(path) else _load_network(Path(path), attention)
    cascade = _cascade(net, cfg.cascade, cfg.get("cascade_affine"), cfg.get("cascade_tol"),
                       cfg.get("prealign"))  # fmt: skip
    settings = None
    if _refines(net, cfg.refine_steps, cascade[0], None):  # the preset's affine_steps: no switch
        settings = RefineSettings.from_config(cfg.refine, steps=cfg.refine_steps)
    return _registrar(net, record, cfg.device, settings, cascade)


def _model_free(path) -> bool:
    return path is None or str(path) == "none"


def _cascade(net, cascade: int | None, cascade_affine: bool | None, cascade_tol: float | None,
             prealign: int | None = None) -> tuple[int, bool, float, int]:  # fmt: skip
    """The one-shot switches, each None taking the network's own (``contract.default_cascade``,
    ``contract.default_prealign``)."""
    passes, affine, tol = contract.default_cascade(net)
    return (passes if cascade is None else int(cascade),
            affine if cascade_affine is None else bool(cascade_affine),
            tol if cascade_tol is None else float(cascade_tol),
            contract.default_prealign(net) if prealign is None else prealign)  # fmt: skip


def _refines(net, steps: int, cascade: int, affine_steps) -> bool:
    """Whether the switches ask for the refinement: a cascade of a network of one size runs
    through it (at the images' size, even with 0 steps); an any-size network cascades alone."""
    any_size = bool(getattr(net, "accepts_any_size", False))
    return bool(net is None or steps or (cascade != 1 and not any_size) or affine_steps)


def _registrar(net, record, device, settings, cascade: tuple[int, bool, float, int]):
    passes, affine, tol, prealign = cascade
    return Registrar(net, settings, cascade=passes, cascade_affine=affine, cascade_tol=tol,
                     prealign=prealign, build_config=record).to(device).eval()  # fmt: skip


def _load_network(path: Path, attention: str) -> tuple[nn.Module, dict]:
    """The network stored in ``path`` (eval mode, CPU) and the checkpoint's record."""
    ckpt = read_checkpoint(path)
    record = ckpt["air_reg"]
    try:
        _check_targets(record.get("model"), "model")  # before anything in it is read
        net_cfg, _ = network_config(record)
        _check_classes(net_cfg)
    except CheckpointError as err:  # one line, even for keys or targets with newlines in them
        raise CheckpointError(f"{path}: {' '.join(str(err).split())}") from None
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net = _build(net_cfg, state, path)
    speed.accelerate(net, attention=attention)
    return net.eval(), record


def __getattr__(name: str):
    if name == "TrainedModel":
        deprecation.warn("air_reg.checkpoint.TrainedModel is deprecated; use air_reg.Registrar")
        return _TrainedModel
    raise AttributeError(f"module 'air_reg.checkpoint' has no attribute {name!r}")


class _TrainedModel(Registrar):
    """The former plain-network return type: ``TrainedModel(net, build_config)``."""

    def __init__(self, net: nn.Module, build_config: dict) -> None:
        super().__init__(net, None, build_config=build_config)


def _build(net_cfg: dict, state: dict, path: Path) -> nn.Module:
    """The network ``net_cfg`` describes, holding the tensors ``state``; a corrupt config is
    refused before it builds for ever or allocates much more than its weights."""
    largest = _largest_int(net_cfg)
    if largest > MAX_INT:
        raise CheckpointError(
            f"{path}: the checkpoint's stored network config holds the integer {largest}, "
            f"beyond any network setting (corrupt or edited); {TRAINED}"
        )
    if largest > SMALL_INT:  # check its shapes on the meta device first: no memory
        _check_fit(_instantiate(net_cfg, state, path, meta=True), state, path)
    net = _instantiate(net_cfg, state, path)
    try:
        net.load_state_dict(state, strict=True)
    except Exception as err:
        raise _misfit(path, str(err)) from err
    return net


class _TooLarge(BaseException):  # not an Exception: hydra and constructors must not wrap it
    pass


class _Budget(TorchFunctionMode):
    """Raises ``_TooLarge`` past ``calls`` torch calls or ``values`` tensor elements made."""

    def __init__(self, calls: int, values: int) -> None:
        super().__init__()
        self.calls, self.values = calls, values

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls -= 1
        if self.calls < 0:
            raise _TooLarge
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            self.values -= tensor.numel() if isinstance(tensor, torch.Tensor) else 0
        if self.values < 0:  # after torch.empty, before the init that would touch it
            raise _TooLarge
        return out


def _instantiate(net_cfg: dict, state: dict, path: Path, meta: bool = False) -> nn.Module:
    """``instantiate(net_cfg)`` within a budget of torch calls and tensor values set by
    ``state``: a corrupt depth or width would build for ever or fill the memory."""
    numel = sum(v.numel() for v in state.values() if torch.is_tensor(v))
    budget = _Budget(calls=20 * len(state) + 2000, values=8 * numel + MAX_EXTRA)
    try:
        with torch.device("meta") if meta else nullcontext(), budget:
            net = instantiate(net_cfg)
        if not isinstance(net, nn.Module):
            raise TypeError(f"it builds a {type(net).__name__}, not a torch.nn.Module")
    except _TooLarge:
        raise CheckpointError(
            f"{path}: the checkpoint's stored network config describes a network far larger "
            f"than its weights (corrupt or edited); {TRAINED}"
        ) from None
    except Exception as err:  # hydra's InstantiationException, TypeError, our ContractError...
        raise CheckpointError(
            f"{path}: the checkpoint's stored network config is invalid or corrupt "
            f"({_root_cause(err)}); {TRAINED}"
        ) from err
    return net


def _check_fit(probe: nn.Module, state: dict, path: Path) -> None:
    """Refuse ``state`` unless it holds ``probe``'s tensors, plus at most ``MAX_EXTRA``
    values of other buffers (shapes only: ``probe`` may live on the meta device)."""
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items() if torch.is_tensor(v)}
    have = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
    if want != have:
        wrong = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        shown = ", ".join(f"{k}: model {want.get(k)}, checkpoint {have.get(k)}" for k in wrong[:3])
        raise _misfit(path, f"{len(wrong)} tensor(s) differ ({shown})")
    total = sum(t.numel() for t in chain(probe.parameters(), probe.buffers()))
    if total - sum(state[k].numel() for k in have) > MAX_EXTRA:
        raise CheckpointError(
            f"{path}: the checkpoint's stored network config describes buffers far larger "
            f"than its weights (corrupt or edited); {TRAINED}"
        )


def _misfit(path: Path, detail: str) -> CheckpointError:
    detail = " ".join(detail.split())[:400]
    return CheckpointError(
        f"{path}: the weights do not fit the model its config describes (edited, or from "
        f"another model or version): {detail}; use the checkpoint written with that config "
        f"or retrain"
    )


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:  # hydra wraps the constructor's own error
        err = err.__cause__
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def _largest_int(node) -> int:
    """The largest magnitude of the ints (not bools) in a config, 0 if none."""
    if isinstance(node, dict):
        return max(map(_largest_int, node.values()), default=0)
    if isinstance(node, list | tuple):
        return max(map(_largest_int, node), default=0)
    return abs(node) if isinstance(node, int) and not isinstance(node, bool) else 0
