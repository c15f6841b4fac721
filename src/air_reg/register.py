"""Register images with a trained model: ``python -m air_reg.register fixed=a.png moving=b.png``.

``fixed``/``moving`` are two image files or two folders whose files pair up by name, in any
format ``data=folder`` reads (PNG, JPEG, TIFF, ``.npy``, 2-D NIfTI). Each image is read and
normalised as the model was trained (``air_reg.data.preprocess.Preprocessing``, from the
checkpoint's data record); the network runs at its trained size -- the pair padded to it
(``data.pad_to``: the flow cropped back) or resized (the flow resized back) -- and the flow is
on the images' own grid; with ``refine_steps`` it is then refined there (``air_reg.refine``),
and ``weights=none`` registers by that optimisation alone. The moving image at its own size is
warped. A pair whose result is not more similar than the unregistered images gets the identity
(``refine.guard``; column ``identity`` of the summary). Writes the warped PNG, the flow ``.npy``
((2, H, W) pixels, channel 0 rows), a figure per pair, ``summary.csv`` and ``config.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from air_reg import zoo
from air_reg.checkpoint import load_configured, shipped_weights
from air_reg.config import CONFIG_DIR
from air_reg.data.files import find_pairs, preprocessing_of, read_pair
from air_reg.data.image_file import output_suffix
from air_reg.errors import ConfigError, UserError
from air_reg.fields import read_field
from air_reg.metrics import mse, smooth_dice
from air_reg.models.components.spatial_transformer import warp
from air_reg.outputs import LANDMARK_FIELDS, Landmarks, has_nibabel, paths_for, write_pair_outputs
from air_reg.pairlog import PairLog
from air_reg.refine import GUARD_TOL, keep_if_better, resize_flow  # noqa: F401 (API)
from air_reg.utils import check_writable, run_cli, write_text

log = logging.getLogger(__name__)
METRICS = ("mse_before", "mse_after", "smooth_dice_before", "smooth_dice_after")
FIELDS = ("name", "fixed", "moving", "height", "width", "spacing", *METRICS, "worse", "identity",
          *LANDMARK_FIELDS)  # fmt: skip
WORSE_TOL = GUARD_TOL  # MSE rise (absolute, on [0, 1] images) below which a pair is not "worse"
MAX_BATCH_PIXELS = 2**22  # pairs refined at once at their own size: at most this many pixels
MODEL_FREE = "none"  # weights=none: the refinement alone, no network (model=none: deprecated)


def model_choice(target: str) -> str:
    """The ``model=`` config (``conf/model/<name>.yaml``) whose network is ``target``; the
    class name in lower case for a network no config builds."""
    for path in sorted(Path(CONFIG_DIR, "model").glob("*.yaml")):
        if OmegaConf.select(OmegaConf.load(path), "net._target_") == target:
            return path.stem
    return target.rsplit(".", 1)[-1].lower()


def weights_name(cfg: DictConfig) -> str:
    """``weights`` when set; else ``air_unet_<data>`` with ``data=``, else the registry's
    default (``air_match_synth``); the deprecated ``model=<m>`` choice still picks
    ``<m>_<data>``."""
    if cfg.get("weights"):
        return str(cfg.weights)
    if cfg.get("model") is not None and cfg.model.get("net") is None:  # model=none
        log.warning("model=none is deprecated; use weights=none (model-free registration)")
        return MODEL_FREE
    dataset = cfg.data.dataset if cfg.get("data") else None
    if cfg.get("model"):
        dataset = dataset or "mnist"
        net = model_choice(cfg.model.net._target_)
        log.warning(
            "choosing shipped weights with model=/data= is deprecated; use weights=%s_%s",
            net,
            dataset,
        )
        return f"{net}_{dataset}"
    return zoo.default_weights(dataset)


def resolve_checkpoint(cfg: DictConfig) -> Path | None:
    """``ckpt_path`` when given, else the shipped ``air_reg/weights/<weights>.ckpt``; None for
    model-free registration (``weights=none``), which needs ``refine_steps``."""
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path).expanduser()
    name = weights_name(cfg)
    if name != MODEL_FREE:
        return shipped_weights(name)
    if not cfg.refine_steps:
        raise ConfigError(
            "weights=none (model-free) registers by the refinement alone: set refine_steps, "
            "e.g. refine_steps=50"
        )
    return None


@torch.no_grad()
def register_batch(
    model,
    fixed: list[torch.Tensor],
    moving: list[torch.Tensor],
    guard: bool = True,
    spacings: list[tuple[float, ...]] | None = None,
    init_flow: torch.Tensor | None = None,
) -> list:
    """(warped, flow) per pair at its own size; pairs may differ in size from one another.

    A refiner (``accepts_any_size``) gets the pairs at their own size, those of one size and
    pixel spacing together (at most ``MAX_BATCH_PIXELS`` at once; ``spacings``, mm per pixel,
    make its regularisation physical), starting from ``init_flow`` (one pair) when given; a
    plain network gets them at its trained size, padded or resized as it was trained
    (``preprocessing_of``), its flows brought back (cropped or resized), and ``guard`` gives
    the identity to a pair it leaves no more similar.
    """
    _check_dimensions(model, fixed[0].ndim - 2)
    params = next(model.parameters(), None)
    device = params.device if params is not None else torch.device("cpu")
    flows: list[torch.Tensor | None] = [None] * len(fixed)
    spacings = spacings or [None] * len(fixed)
    judge = getattr(model, "guard_similarity", "mse")  # mi for a contrast-invariant network
    if getattr(model, "accepts_any_size", False):
        for group in _same_size_groups(fixed, spacings):
            f = torch.cat([fixed[i] for i in group]).to(device)  # (B, 1, H, W)
            m = torch.cat([moving[i] for i in group]).to(device)
            refines = getattr(model, "settings", None) is not None
            extra = {} if init_flow is None else {"init_flow": init_flow.to(device)}
            if spacings[group[0]] is not None and refines:
                extra["spacing"] = spacings[group[0]]
            out = model(f, m, **extra).cpu()
            if guard and not refines:  # the network's one-shot flows, each pair judged alone
                out = keep_if_better(out, f.cpu(), m.cpu(), judge)[0]  # per-pair measures
            for i, flow in zip(group, out, strict=True):
                flows[i] = flow[None]
    else:
        if init_flow is not None:
            raise ConfigError("init_flow starts the refinement: set refine_steps, e.g. 50")
        prep, size = preprocessing_of(model)
        f = torch.cat([prep.to_model(x, size) for x in fixed]).to(device)  # (B, 1, h, w)
        m = torch.cat([prep.to_model(x, size) for x in moving]).to(device)
        for i, flow in enumerate(model(f, m).cpu()):  # (D, *size) on the model's grid
            flows[i] = prep.from_model(flow[None], tuple(moving[i].shape[2:]))  # (1, D, *size)
            if guard:  # not more similar than doing nothing: the identity
                flows[i] = keep_if_better(flows[i], fixed[i], moving[i], judge)[0]
    return [(warp(mov, flow), flow) for flow, mov in zip(flows, moving, strict=True)]


def _same_size_groups(images: list[torch.Tensor], spacings=None) -> list[list[int]]:
    """Indices of the images by size (and spacing), each group at most ``MAX_BATCH_PIXELS``
    pixels."""
    spacings = spacings or [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for i, x in enumerate(images):
        by_size.setdefault((tuple(x.shape[2:]), spacings[i]), []).append(i)
    groups = []
    for (size, _), idx in by_size.items():
        per_call = max(1, MAX_BATCH_PIXELS // math.prod(size))
        groups += [idx[j : j + per_call] for j in range(0, len(idx), per_call)]
    return groups


def _check_dimensions(model, ndim: int) -> None:
    """A network built for images given volumes (or the reverse): one line naming the fix."""
    size = getattr(model, "image_size", None)  # None: model-free, any dimension
    if size is not None and len(size) != ndim:
        kind = {2: "images", 3: "volumes"}
        raise ConfigError(
            f"the model registers {len(size)}-D {kind.get(len(size), 'arrays')} and these are "
            f"{ndim}-D {kind.get(ndim, 'arrays')}: use a model trained on {kind.get(ndim)} "
            f"(ckpt_path=...), or register model-free: weights=none refine_steps=50"
        )


ON_ERROR = ("skip", "stop")


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def register(cfg: DictConfig) -> dict:
    """Register every pair, write the outputs; returns mean metrics, time and per-pair rows.

    Folders: a pair that cannot be read is recorded and skipped (``on_error=skip``, the
    default for folders) or stops the run (``stop``, the default for two files); either way
    ``summary.csv`` lists every pair, with an ``error`` column. ``resume=true`` skips the pairs
    a previous run into the same ``out_dir`` finished (``air_reg.pairlog``). The composed
    config goes to ``out_dir/config.yaml`` with the summary, not to the terminal.
    """
    start = time.perf_counter()
    fixed_in, moving_in = Path(cfg.fixed).expanduser(), Path(cfg.moving).expanduser()
    pairs = find_pairs(fixed_in, moving_in)
    folders = fixed_in.is_dir()
    on_error = cfg.get("on_error") or ("skip" if folders else "stop")
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    batch_size = int(cfg.batch_size) if folders else 1
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}; e.g. batch_size=32")
    model = load_configured(resolve_checkpoint(cfg), cfg)
    prep, size = preprocessing_of(model)
    if cfg.get("normalize"):
        prep = dataclasses.replace(prep, normalize=str(cfg.normalize))
    init_flow = cfg.get("init_flow")
    if init_flow and folders:
        raise ConfigError("init_flow= starts one pair: pass two image files, not folders")
    itk_field = bool(cfg.get("itk_field", True)) and has_nibabel()
    landmarks = Landmarks.of(cfg)
    landmarks.check()
    if landmarks and folders:
        raise ConfigError("labels and points go with one pair: pass two image files")
    guard = bool(cfg.refine.get("guard", True))
    draw = None
    if cfg.figures:
        from air_reg.viz import pair_figure as draw  # matplotlib: only when figures are drawn
    created = not Path(cfg.out_dir).expanduser().is_dir()
    out_dir = check_writable(cfg.out_dir)  # after every check: a refusal leaves no folder
    pairlog = PairLog(out_dir, FIELDS, resume=bool(cfg.get("resume")), persist=folders)
    todo = [p for p in pairs if not pairlog.done(p[0])]
    compute_s, stopped, suffix, written = 0.0, None, ".png", []
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), unit="pair", desc="register",
               disable=not folders)  # fmt: skip
    try:
        for i in range(0, len(todo), batch_size):
            chunk = _read_chunk(todo[i : i + batch_size], pairlog, on_error, prep, size,
                                cfg.get("channel"))  # fmt: skip
            if chunk:
                start_flow = None
                if init_flow:  # one pair: on the fixed image's grid, in its pixels
                    fixed_file = chunk[0][3].fixed_file
                    start_flow = read_field(init_flow, fixed_file.geometry,
                                            tuple(fixed_file.values.shape))  # fmt: skip
                tic = time.perf_counter()
                results = register_batch(
                    model,
                    [c[3].fixed for c in chunk],
                    [c[3].moving for c in chunk],
                    guard,
                    [c[3].spacing for c in chunk],
                    start_flow,
                )
                compute_s += time.perf_counter() - tic
                for (name, f_path, m_path, pair), (warped, flow) in zip(
                    chunk, results, strict=True
                ):
                    if not pair.same_grid:  # one interpolation from the moving file's grid
                        warped = pair.warp(pair.moving_native, flow)
                    suffix = output_suffix(pair.fixed_file)
                    paths = paths_for(out_dir, name, folders, suffix)
                    extra, writes = landmarks.measure(out_dir, pair, flow)  # checked first
                    write_pair_outputs(paths, pair, warped, flow, itk_field)
                    for path, write in writes.items():
                        write(path)
                    written = [p.name for p in writes]
                    if draw is not None:
                        draw(pair.fixed, pair.moving, warped, flow, paths["figure"],
                             titles=[name])  # fmt: skip
                    pairlog.add({**_row(name, f_path, m_path, pair, warped, flow), **extra})
            bar.update(min(batch_size, len(todo) - i))
    except BaseException as err:
        stopped = err
        raise
    finally:
        bar.close()
        if stopped is not None and folders:  # the summary still lists every pair
            why = f"not registered: the run stopped ({_one_line(stopped)[:200]})"
            for name, f_path, m_path in pairs:
                if not pairlog.done(name):
                    pairlog.rows[name] = {"name": name, "fixed": str(f_path),
                                          "moving": str(m_path), "error": why}  # fmt: skip
        if folders or stopped is None:  # two files: all or nothing
            write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg))
            pairlog.close(write=True)
        else:
            pairlog.close(write=False)
            if created:  # and nothing in it: a refused pair leaves no empty run folder
                with contextlib.suppress(OSError):
                    out_dir.rmdir()
    outputs = [*paths_for(Path(), "<name>", folders, suffix).values(), *written,
               "summary.csv", "config.yaml"]  # fmt: skip
    shown = " ".join(str(o) for o in outputs if (cfg.figures or "figure" not in str(o))
                     and (itk_field or "field" not in str(o)))  # fmt: skip
    return _report(pairlog, compute_s, time.perf_counter() - start, out_dir, shown)


def _read_chunk(chunk, pairlog: PairLog, on_error: str, prep, size, channel) -> list[tuple]:
    """(name, fixed path, moving path, ``Pair``) of the pairs that read; failures logged."""
    out = []
    for name, f_path, m_path in chunk:
        try:
            out.append((name, f_path, m_path, read_pair(f_path, m_path, prep, size, channel)))
        except UserError as err:
            if on_error == "stop":
                raise
            log.warning("skipped %s: %s", name, _one_line(err))
            pairlog.add({"name": name, "fixed": str(f_path), "moving": str(m_path),
                         "error": _one_line(err)})  # fmt: skip
    return out


def _row(name, f_path, m_path, pair, warped, flow) -> dict:
    fix, mov = pair.fixed, pair.moving
    before, after = mse(mov, fix).item(), mse(warped, fix).item()
    return {
        "name": name,
        "fixed": str(f_path),
        "moving": str(m_path),
        "height": fix.shape[-2],
        "width": fix.shape[-1],
        "spacing": "x".join(f"{s:g}" for s in pair.spacing),
        "mse_before": before,
        "mse_after": after,
        "smooth_dice_before": smooth_dice(mov, fix).item(),
        "smooth_dice_after": smooth_dice(warped, fix).item(),
        "worse": int(after > before + WORSE_TOL),
        "identity": int(not flow.any()),  # the guard's identity (or nothing to move)
    }


def _report(
    pairlog: PairLog, compute_s: float, total_s: float, out_dir: Path, outputs: str
) -> dict:
    ok = [r for r in pairlog.rows.values() if not r["error"]]
    means = {k: sum(float(r[k]) for r in ok) / len(ok) if ok else float("nan") for k in METRICS}
    failed = len(pairlog.rows) - len(ok)
    worse = sorted(r["name"] for r in ok if int(r.get("worse") or 0))
    if worse:  # never silently worse than doing nothing
        log.warning(
            "%d of %d pair(s) are less similar after registration than before (MSE up; "
            "summary.csv column worse=1), e.g. %s: try refine_steps=50 or another model",
            len(worse),
            len(ok),
            ", ".join(worse[:5]),
        )
    kept = [r["name"] for r in ok if int(r.get("identity") or 0) and float(r["mse_before"]) > 0]
    if kept:  # the guard's identity: the registration was not more similar than nothing
        log.warning(
            "%d of %d pair(s) got the identity: the registration left them no more similar "
            "(summary.csv column identity=1), e.g. %s; try refine_steps=50 or weights=none",
            len(kept),
            len(ok),
            ", ".join(kept[:5]),
        )
    if ok:
        log.info(
            "%d pair(s): MSE %.5f -> %.5f, smooth Dice %.4f -> %.4f (before -> after)",
            len(ok),
            means["mse_before"],
            means["mse_after"],
            means["smooth_dice_before"],
            means["smooth_dice_after"],
        )
    log.info(
        "Registration took %.3f s (%.1f ms per pair), %.2f s in all with I/O; wrote %s to %s",
        compute_s,
        1000 * compute_s / max(len(ok), 1),
        total_s,
        outputs,
        out_dir,
    )
    return {
        "num_pairs": len(ok),
        "failed": failed,
        "worse": len(worse),
        "identity": len(kept),
        **means,
        "seconds": compute_s,
        "total_seconds": total_s,
        "output_dir": str(out_dir),
        "pairs": sorted(pairlog.rows.values(), key=lambda r: r["name"]),
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="register")
def main(cfg: DictConfig) -> None:
    result = run_cli(register, cfg)
    if result["failed"]:
        log.error(
            "%d of %d pair(s) failed, the others are registered: see %s/failures.csv",
            result["failed"],
            result["failed"] + result["num_pairs"],
            result["output_dir"],
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
