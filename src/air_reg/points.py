"""Points carried by a saved field, their files, and the target registration error.

Points are (N, D) indices: ``map_points`` takes fixed points to the moving image (the flow
interpolated at them), ``invert_points`` moving points back to the fixed image (solving
``moving_index(p + flow(p)) = q`` by damped Newton steps from the fixed-point guess
``y - flow(y)``); ``tre`` measures them against landmarks in px and mm.

Points files are CSV with a header: columns ``x,y[,z]`` are physical LPS millimetres (a pixel
image: x = column, y = row, as ITK reads a PNG), or ``i,j[,k]`` array indices (i = axis 0, a
PNG's rows); other columns pass through unchanged, and a result keeps the input's columns.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from air_reg.errors import DataError
from air_reg.geometry import Geometry, as_flow, moving_index
from air_reg.utils import write_text

PHYSICAL, INDEX = ("x", "y", "z"), ("i", "j", "k")
OUTSIDE_PX = 0.5  # points may lie this far beyond the outer pixel centres


# -- points --------------------------------------------------------------------------------
def interpolate(field: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """A field ([1,] C, *size) linearly interpolated at (N, D) indices, border-clamped:
    (N, C) float64; exactly the field's values at pixel centres."""
    points = np.asarray(points, dtype=np.float64)
    d = points.shape[1]
    f = torch.as_tensor(field).reshape(field.shape[-d - 1 :]).double().numpy()  # (C, *size)
    size = np.array(f.shape[1:])
    p = np.clip(points, 0, size - 1)
    lo = np.minimum(np.floor(p), np.maximum(size - 2, 0)).astype(np.int64)  # (N, D)
    frac = p - lo
    out = np.zeros((len(p), f.shape[0]))
    for corner in itertools.product((0, 1), repeat=d):
        idx = np.minimum(lo + corner, size - 1)
        weight = np.prod(np.where(corner, frac, 1 - frac), axis=1)  # (N,)
        out += weight[:, None] * f[(slice(None), *idx.T)].T
    return out


def _to_moving(fixed_geom: Geometry, moving_geom: Geometry, points: np.ndarray) -> np.ndarray:
    """(N, D) fixed indices -> (N, D) moving indices through physical space."""
    t = torch.from_numpy(np.ascontiguousarray(points.T, dtype=np.float64))[None]  # (1, D, N)
    return moving_index(fixed_geom, moving_geom, t)[0].T.numpy()


def map_points(
    points: np.ndarray, flow: torch.Tensor, fixed_geom: Geometry, moving_geom: Geometry
) -> np.ndarray:
    """Fixed-image points (N, D) -> the moving image's indices (N, D) there:
    ``moving_index(p + flow(p))``, the flow interpolated linearly at the points."""
    p = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    return _to_moving(fixed_geom, moving_geom, p + interpolate(as_flow(flow)[0], p))


def invert_points(
    points: np.ndarray,
    flow: torch.Tensor,
    fixed_geom: Geometry,
    moving_geom: Geometry,
    *,
    iters: int = 100,
    tol: float = 1e-4,
) -> np.ndarray:
    """Moving-image points (N, D) -> the fixed indices p (N, D) with
    ``moving_index(p + flow(p)) = q``, to ``tol`` fixed pixels; a point that does not converge
    in ``iters`` steps (a field that folds there) is a one-line error naming its row."""
    flow = as_flow(flow)[0]
    q = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    y = _to_moving(moving_geom, fixed_geom, q)  # p + flow(p) must land here (fixed pixels)

    def residual(p: np.ndarray, target: np.ndarray) -> np.ndarray:  # (N, D) fixed pixels
        return p + interpolate(flow, p) - target

    p = y - interpolate(flow, y)  # one fixed-point step: exact for a constant flow
    r = residual(p, y)
    err, step = np.linalg.norm(r, axis=1), np.ones(len(p))
    for _ in range(iters):
        todo = np.flatnonzero(err > tol)
        if not todo.size:
            break
        delta = _newton_step(flow, p[todo], r[todo])
        trial = p[todo] - step[todo, None] * delta
        r_t = residual(trial, y[todo])
        err_t = np.linalg.norm(r_t, axis=1)
        better = err_t < err[todo]
        keep = todo[better]
        p[keep], r[keep], err[keep] = trial[better], r_t[better], err_t[better]
        step[todo] = np.where(better, np.minimum(step[todo] * 2, 1.0), step[todo] / 2)
    bad = np.flatnonzero(~(err <= tol))
    if bad.size:
        rows = ", ".join(str(i + 1) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise DataError(
            f"{bad.size} of {len(p)} point(s) (rows {rows}) could not be mapped back: "
            f"no fixed point maps onto them within {tol:g} px after {iters} steps "
            f"(residual up to {err[bad].max():.3g} px); the field is not invertible "
            f"there (it folds): check the field or leave those points out"
        )
    return p


def _newton_step(flow: torch.Tensor, p: np.ndarray, r: np.ndarray, h: float = 1e-3) -> np.ndarray:
    """(N, D) solution of (I + d flow / dp) delta = r at points p; the fixed-point step r
    where that Jacobian is singular."""
    d = p.shape[1]
    jac = np.repeat(np.eye(d)[None], len(p), axis=0)  # (N, D, D)
    for axis in range(d):
        e = np.eye(d)[axis] * h
        jac[:, :, axis] += (interpolate(flow, p + e) - interpolate(flow, p - e)) / (2 * h)
    ok = np.abs(np.linalg.det(jac)) > 1e-6
    delta = r.copy()
    delta[ok] = np.linalg.solve(jac[ok], r[ok][..., None])[..., 0]
    return delta


def tre(mapped: np.ndarray, target: np.ndarray, geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Target registration error of (N, D) points in ``geom``'s indices: per-point distances
    (N,) in pixels and in millimetres."""
    diff = np.asarray(mapped, dtype=np.float64) - np.asarray(target, dtype=np.float64)
    return np.linalg.norm(diff, axis=1), np.linalg.norm(diff @ geom.matrix.T, axis=1)


# -- points files --------------------------------------------------------------------------
@dataclass(frozen=True)
class PointsFile:
    """A points CSV as read: its header, rows (strings, kept for the other columns), and the
    coordinate columns (``x,y[,z]`` physical or ``i,j[,k]`` index)."""

    path: Path
    fieldnames: tuple[str, ...]
    rows: tuple[dict, ...]
    columns: tuple[str, ...]
    physical: bool


def read_points(
    path: str | Path, geometry: Geometry, size: tuple[int, ...], *, image: str = "image"
) -> tuple[PointsFile, np.ndarray]:
    """A points CSV and its points as (N, D) indices of ``geometry``; a point more than half a
    pixel beyond the ``size`` grid is refused (``image`` names that image in the error)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"points file {path} does not exist; check the path")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = tuple(reader)
            fieldnames = tuple(reader.fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(
            f"points file {path} could not be read ({err}); pass a CSV with a header row"
        ) from err
    d = geometry.ndim
    names = {n.strip().lower(): n for n in fieldnames if n}
    found = [kind for kind in (PHYSICAL, INDEX) if all(c in names for c in kind[:d])]
    extra = [c for kind in (PHYSICAL, INDEX) for c in kind[d:] if c in names]
    if len(found) != 1 or extra:
        why = (
            "both x,y and i,j"
            if len(found) > 1
            else f"a {extra[0]} column"
            if extra
            else f"columns {list(fieldnames)}"
        )
        raise DataError(
            f"points file {path} has {why}; a {d}-D image's points need columns "
            f"{','.join(PHYSICAL[:d])} (physical LPS mm) or {','.join(INDEX[:d])} "
            f"(array indices), plus any others (name, id, ...)"
        )
    columns = tuple(names[c] for c in found[0][:d])
    values = np.zeros((len(rows), d))
    for n, row in enumerate(rows):
        try:
            values[n] = [float(row[c]) for c in columns]
        except (TypeError, ValueError):
            raise DataError(
                f"points file {path} row {n + 1}: {[row.get(c) for c in columns]} "
                f"are not numbers; fix that row"
            ) from None
    if not np.isfinite(values).all():
        n = int(np.flatnonzero(~np.isfinite(values).all(1))[0])
        raise DataError(f"points file {path} row {n + 1} holds NaN or inf; fix that row")
    physical = found[0] is PHYSICAL
    points = PointsFile(path, fieldnames, rows, columns, physical)
    index = to_index(values, geometry) if physical else values
    off = outside(index, size)
    if off.any():
        n = int(np.flatnonzero(off)[0])
        shown = ", ".join(f"{c}={rows[n][c]}" for c in columns)
        raise DataError(
            f"points file {path} row {n + 1} ({shown}) lies outside the {image} "
            f"({' x '.join(map(str, size))} pixels, indices -0.5 to size - 0.5); "
            f"give points on that image, in its space"
        )
    return points, index


def outside(index: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """(N,) whether each of (N, D) indices lies more than half a pixel beyond the grid."""
    return ((index < -OUTSIDE_PX) | (index > np.array(size) - 1 + OUTSIDE_PX)).any(1)


def to_index(physical: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(N, D) physical LPS mm -> (N, D) indices of ``geometry``."""
    return (np.asarray(physical) - np.array(geometry.origin)) @ np.linalg.inv(geometry.matrix).T


def to_physical(index: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(N, D) indices of ``geometry`` -> (N, D) physical LPS mm."""
    return np.asarray(index) @ geometry.matrix.T + np.array(geometry.origin)


def _number(v: float) -> str:
    return f"{round(float(v), 6) + 0.0:.15g}"  # 1e-6 px or mm; no "-0"


def points_csv(points: PointsFile, index: np.ndarray, geometry: Geometry) -> str:
    """``points``' CSV with its coordinates replaced by ``index`` (N, D) of ``geometry``, in
    the input's columns (physical or index); the other columns unchanged."""
    import io

    values = to_physical(index, geometry) if points.physical else index
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(points.fieldnames), lineterminator="\n")
    writer.writeheader()
    for row, v in zip(points.rows, values, strict=True):
        writer.writerow({**row, **{c: _number(x) for c, x in zip(points.columns, v, strict=True)}})
    return out.getvalue()


def write_points(
    path: str | Path, points: PointsFile, index: np.ndarray, geometry: Geometry
) -> Path:
    """``points_csv`` written to ``path`` atomically."""
    write_text(path, points_csv(points, index, geometry))
    return Path(path)
