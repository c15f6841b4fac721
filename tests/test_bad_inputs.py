"""Bad inputs fail with one clear line that names the problem and the fix; nothing half-written.

Each row of ``CASES`` sets up one bad input under ``tmp`` and runs the call that must refuse
it; rows marked slow need the shared trained checkpoint (about 10 s to train, once).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from PIL import Image
from test_register import trained_checkpoint

from air_reg import CheckpointError
from air_reg.data.files import read_pair
from air_reg.data.idx import FILES, default_data_root, load_dataset
from air_reg.data.image_file import read_image_file
from air_reg.errors import DataError, UserError
from air_reg.images import ImageError, read_image, save_npy, write_image
from air_reg.register import register


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory)


# ---- small helpers that make (bad) files; each returns the path it wrote -------------------
def png(path: Path, size: int = 28) -> Path:
    write_image(path, torch.rand(1, 1, size, size))
    return path


def npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def nifti(path: Path, array: np.ndarray, shift: float = 0.0) -> Path:
    nib = pytest.importorskip("nibabel")
    affine = np.eye(4)
    affine[0, 3] = shift
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), path)
    return path


def raw_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def first_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    return raw_bytes(dst, data[: len(data) // 2])


def torch_file(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def with_state_dict_key_dropped(src: Path, dst: Path) -> Path:
    ckpt = torch.load(src, weights_only=True)
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    return torch_file(dst, ckpt)


def unsafe_checkpoint(tmp: Path) -> Path:
    """A checkpoint whose stored config would run a shell command if instantiated."""
    model = {"_target_": "os.system", "_args_": [f"touch {tmp / 'pwned'}"]}
    return torch_file(tmp / "unsafe.ckpt", {"state_dict": {}, "air_reg": {"model": model}})


def idx_root(tmp: Path, first: bytes) -> Path:
    """A data root whose MNIST files all exist, the first holding ``first``."""
    raw = tmp / "MNIST" / "raw"
    for i, name in enumerate(FILES):
        raw_bytes(raw / name, first if i == 0 else b"")
    return tmp


def reg(tmp: Path, *overrides: str, fixed=None, moving=None, ckpt=None) -> dict:
    """``register`` on a valid 28 x 28 pair (unless given) with ``overrides``."""
    fixed = fixed or png(tmp / "f.png")
    moving = moving or png(tmp / "m.png")
    args = [f"fixed={fixed}", f"moving={moving}", f"out_dir={tmp / 'out'}"]
    args += [f"ckpt_path={ckpt}"] if ckpt else []
    return register(compose_config("register", [*args, *overrides], tmp))


def folders(tmp: Path, fixed_names: list[str], moving_names: list[str]) -> tuple[Path, Path]:
    for name in fixed_names:
        png(tmp / "fixed" / name)
    for name in moving_names:
        png(tmp / "moving" / name)
    return tmp / "fixed", tmp / "moving"


def folder_args(pair: tuple[Path, Path]) -> list[str]:
    return [f"fixed={pair[0]}", f"moving={pair[1]}"]


def case(id_: str, act, exc: type[Exception], *fragments: str, slow: bool = False):
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(act, exc, fragments, id=id_, marks=marks)


MNIST_LABELS = default_data_root() / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"

# act(tmp, ckpt) builds the bad input and makes the call; ckpt() is the trained checkpoint.
# fragments: "{tmp}" stands for the test's temporary folder.
CASES = [
    # -- images --------------------------------------------------------------------------------
    case("image-missing", lambda t, c: read_image(t / "nope.png"), ImageError,
         "does not exist", "check the path"),
    case("image-empty", lambda t, c: read_image(raw_bytes(t / "e.png", b"")), ImageError,
         "empty file (0 bytes)", "re-export or re-copy"),
    case("png-truncated",
         lambda t, c: read_image(first_half(png(t / "a.png", 64), t / "half.png")), ImageError,
         "truncated or corrupt", "re-export or re-copy"),
    case("not-an-image", lambda t, c: read_image(raw_bytes(t / "n.png", b"hello\n")), ImageError,
         "not an image", "export it as PNG, JPEG or TIFF"),
    case("npy-nan", lambda t, c: read_image(npy(t / "a.npy", np.full((4, 4), np.nan))),
         ImageError, "16 pixel(s) are NaN", "np.nan_to_num"),
    case("npy-inf", lambda t, c: read_image(npy(t / "a.npy", np.array([[0.5, np.inf]]))),
         ImageError, "1 pixel(s) are inf", "np.nan_to_num"),
    case("npy-float-out-of-range",
         lambda t, c: read_image(npy(t / "a.npy", np.linspace(0, 255, 16).reshape(4, 4))),
         ImageError, "must lie in [0, 1], got [0, 255]", "rescale them"),
    case("npy-3d", lambda t, c: read_image(npy(t / "a.npy", np.zeros((3, 8, 8), np.uint8))),
         ImageError, "2-D (H, W)", "(3, 8, 8) (3-D)", "one image per file"),
    case("npy-truncated",
         lambda t, c: read_image(first_half(npy(t / "a.npy", np.zeros((64, 64))), t / "h.npy")),
         ImageError, "could not be read as a .npy", "re-save it with np.save"),
    case("npy-int64", lambda t, c: read_image(npy(t / "a.npy", np.zeros((4, 4), np.int64))),
         ImageError, "unsupported pixel type int64", "save uint8 (0-255)"),
    # -- register: pairs and folders ---------------------------------------------------------
    case("no-overlap",
         lambda t, c: reg(t, "weights=none", "refine_steps=2",
                          fixed=nifti(t / "f.nii.gz", np.random.rand(28, 28)),
                          moving=nifti(t / "m.nii.gz", np.random.rand(28, 28), shift=500.0)),
         ImageError, "do not overlap in physical space", "check their headers"),
    case("init-flow-wrong-size",
         lambda t, c: reg(t, "weights=none", "refine_steps=2",
                          f"init_flow={npy(t / 'w.npy', np.zeros((2, 20, 20), np.float32))}"),
         DataError, "w.npy is (2, 20, 20) but the fixed image needs (2, 28, 28)"),
    case("folders-unmatched",
         lambda t, c: reg(t, *folder_args(folders(t, ["a.png", "b.png"], ["a.png", "c.png"]))),
         ImageError, "do not pair up by file name", "only in fixed: b.png",
         "only in moving: c.png", "same file name in both folders"),
    case("nifti-volume", lambda t, c: reg(t, fixed=nifti(t / "v.nii.gz", np.zeros((28, 28, 3)))),
         ImageError, "v.nii.gz is a 3-D volume of shape (28, 28, 3)",
         "two 2-D images or two volumes", "save the slice to register as its own file"),
    case("register-npy-volume",
         lambda t, c: reg(t, fixed=npy(t / "v.npy", np.zeros((3, 28, 28), np.float32))),
         ImageError, "v.npy is a 3-D volume of shape (3, 28, 28)", "np.save('slice.npy'"),
    case("nifti-out-of-range",
         lambda t, c: reg(t, "weights=air_unet_mnist",  # trained on [0, 1]: normalize none
                          fixed=nifti(t / "s.nii", np.linspace(0, 700, 784).reshape(28, 28))),
         ImageError, "s.nii: values lie in [0, 700], outside [0, 1]", "normalize=none",
         "rescale the image to [0, 1]"),
    case("folder-and-file",
         lambda t, c: reg(t, fixed=folders(t, ["a.png"], [])[0]), ImageError,
         "fixed is a folder but moving is not", "two image files or two folders"),
    case("output-not-writable",
         lambda t, c: reg(t, f"out_dir={raw_bytes(t / 'file.txt', b'x') / 'sub'}"),
         PermissionError, "file.txt/sub is not writable", "paths.output_dir="),
    # -- checkpoints ---------------------------------------------------------------------------
    case("no-such-shipped-weights", lambda t, c: reg(t, "weights=nope"), CheckpointError,
         "no shipped weights nope.ckpt", "pass ckpt_path="),
    case("ckpt-missing", lambda t, c: reg(t, ckpt=t / "none.ckpt"), CheckpointError,
         "none.ckpt does not exist", "written by `python -m air_reg.train`"),
    case("ckpt-corrupt",
         lambda t, c: reg(t, ckpt=raw_bytes(t / "x.ckpt", os.urandom(4096))), CheckpointError,
         "could not be read as a safe checkpoint (corrupt", "retrain or re-download it"),
    case("ckpt-truncated", lambda t, c: reg(t, ckpt=first_half(c(), t / "half.ckpt")),
         CheckpointError, "could not be read as a safe checkpoint (corrupt, truncated",
         "retrain or re-download it", slow=True),
    case("ckpt-not-air-reg",
         lambda t, c: reg(t, ckpt=torch_file(t / "o.ckpt", {"state_dict": {}, "epoch": 3})),
         CheckpointError, "is not an air-reg checkpoint", "written by `python -m air_reg.train`"),
    case("ckpt-other-model",
         lambda t, c: reg(t, ckpt=with_state_dict_key_dropped(c(), t / "other.ckpt")),
         CheckpointError, "weights do not fit the model", "from another model",
         slow=True),
    case("ckpt-unsafe-target", lambda t, c: reg(t, ckpt=unsafe_checkpoint(t)), CheckpointError,
         "names 'os.system'", "so it was not loaded"),
    # -- data files ------------------------------------------------------------------------------
    case("data-missing", lambda t, c: load_dataset("mnist", root=t, download=False),
         FileNotFoundError, "mnist data missing", "in {tmp}/MNIST/raw/", "set paths.data_dir"),
    case("idx-corrupt",
         lambda t, c: load_dataset("mnist", root=idx_root(t, os.urandom(512)), download=False),
         RuntimeError, "is corrupt or truncated", "replace it with the original"),
    case("idx-truncated",
         lambda t, c: load_dataset(
             "mnist", root=idx_root(t, MNIST_LABELS.read_bytes()[:4000]), download=False
         ),
         RuntimeError, "is corrupt or truncated", "replace it with the original"),
    # -- Hydra ---------------------------------------------------------------------------------
    case("hydra-unknown-key", lambda t, c: compose_config("register", ["nonexistent_key=1"], t),
         ConfigCompositionException, "Could not override 'nonexistent_key'",
         "+nonexistent_key=1"),
    case("hydra-unknown-option", lambda t, c: compose_config("train", ["model=transformer"], t),
         MissingConfigException, "Could not find 'model/transformer'", "Available options"),
]  # fmt: skip


@pytest.mark.parametrize(("act", "exc", "fragments"), CASES)
def test_bad_input_fails_with_a_clear_message(tmp_path, request, act, exc, fragments):
    with pytest.raises(exc) as info:
        act(tmp_path, lambda: request.getfixturevalue("ckpt"))
    message = str(info.value)
    for fragment in fragments:
        assert fragment.format(tmp=tmp_path) in message, f"{fragment!r} not in {message!r}"
    if not isinstance(info.value, HydraException):  # Hydra's own errors span lines
        assert "\n" not in message, message


def test_unsafe_checkpoint_runs_nothing(tmp_path):
    with pytest.raises(CheckpointError):
        reg(tmp_path, ckpt=unsafe_checkpoint(tmp_path))
    assert not (tmp_path / "pwned").exists()


def _pil(path: Path, mode: str, array: np.ndarray) -> Path:
    image = Image.fromarray(array)  # (H, W) uint16 -> "I;16", (H, W, 3) uint8 -> "RGB"
    (image if mode == "I;16" else image.convert(mode)).save(path)
    return path


RGB = (np.arange(3 * 8 * 8).reshape(8, 8, 3) % 256).astype(np.uint8)
CONVERTED = [  # (mode written, array, expected level, log fragment)
    pytest.param("RGB", RGB, logging.WARNING, "converted RGB to grayscale", id="rgb"),
    pytest.param("RGBA", RGB, logging.WARNING, "converted RGBA to grayscale", id="rgba"),
    pytest.param("P", RGB, logging.WARNING, "converted P to grayscale", id="palette"),
    pytest.param(
        "I;16", (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16), logging.INFO,
        "16-bit image, scaled by 1/65535", id="16-bit",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("mode", "array", "level", "fragment"), CONVERTED)
def test_colour_and_16_bit_images_are_converted(tmp_path, caplog, mode, array, level, fragment):
    path = _pil(tmp_path / "img.png", mode, array)
    with caplog.at_level(logging.INFO, logger="air_reg.images"):
        image = read_image(path)
    assert image.shape == (1, 1, 8, 8)
    assert 0 <= image.min() <= image.max() <= 1
    assert any(r.levelno == level and fragment in r.getMessage() for r in caplog.records)
    if mode == "I;16":
        assert torch.allclose(image[0, 0], torch.from_numpy(array / 65535).float())
    if mode == "RGB":  # luminance, as PIL's "L" conversion
        want = np.asarray(Image.fromarray(array).convert("L")) / 255
        assert torch.allclose(image[0, 0], torch.from_numpy(want).float())


@pytest.mark.parametrize(("mode", "array", "level", "fragment"), CONVERTED)
def test_register_decodes_an_image_file_once(tmp_path, caplog, monkeypatch, mode, array, level,
                                             fragment):  # fmt: skip
    """register's reading (values and, for colour, the colours) opens and decodes the file
    once, so its conversion notice is logged once; the grey values are read_image's."""
    path = _pil(tmp_path / "img.png", mode, array)
    opened, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    with caplog.at_level(logging.INFO, logger="air_reg.images"):
        got = read_image_file(path)
    assert len(opened) == 1
    assert sum(fragment in r.getMessage() for r in caplog.records) == 1
    assert np.array_equal(got.values, read_image(path)[0, 0].numpy())
    assert (got.colour is not None) == (mode != "I;16")
    picked = read_image_file(path, channel="green")  # a channel instead of the luminance
    if got.colour is not None:
        assert np.array_equal(picked.values, got.colour[..., 1])


def test_pixel_files_of_different_sizes_are_registered_with_a_warning(tmp_path, caplog):
    """Two PNGs of different sizes: the moving one is placed as ITK places pixel files (a
    shared first pixel, unit spacing), with a warning giving its coverage and the fix."""
    big = _pil(tmp_path / "big.png", "L", np.full((16, 20), 100, np.uint8))
    small = _pil(tmp_path / "small.png", "L", np.full((8, 10), 200, np.uint8))
    with caplog.at_level(logging.WARNING, logger="air_reg.data.files"):
        pair = read_pair(big, small)
    assert pair.moving.shape == pair.fixed.shape == (1, 1, 16, 20)
    message = " ".join(r.getMessage() for r in caplog.records)
    for fragment in ("16 x 20", "8 x 10", "25.0 %", "resize one to the other's size"):
        assert fragment in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="air_reg.data.files"):
        read_pair(big, big)
    assert not caplog.records


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def half_then_fail(file, array, **kwargs):
        file.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_npy(tmp_path / "out" / "flow.npy", np.zeros((2, 4, 4)))
    assert _leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("bad", ["weights=nope", "on_error=maybe", "refine_steps=-1"])
def test_a_refused_setting_creates_no_output_folder(tmp_path, bad):
    """The settings and the model are checked before ``out_dir`` is made: a typo leaves no
    empty run folder behind to be mistaken for a result."""
    with pytest.raises(UserError):
        reg(tmp_path, bad)
    assert not (tmp_path / "out").exists()


def test_a_refused_pair_leaves_no_empty_run_folder(tmp_path):
    """A pair refused once it is read (a volume for a 2-D model) ends the run with nothing
    written, not even the output folder it made."""
    volume = npy(tmp_path / "v.npy", np.zeros((3, 28, 28), np.float32))
    with pytest.raises(UserError, match="registers 2-D images and these are 3-D volumes"):
        reg(tmp_path, fixed=volume, moving=volume)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()  # a folder the user made stays
    with pytest.raises(UserError):
        reg(tmp_path, fixed=volume, moving=volume)
    assert (tmp_path / "out").is_dir()


@pytest.mark.slow
def test_failed_register_leaves_no_half_written_files(tmp_path, ckpt, monkeypatch):
    fixed, moving, bad = (
        png(tmp_path / "f.png"),
        png(tmp_path / "m.png"),
        raw_bytes(tmp_path / "b.png", b"not an image"),
    )
    # refused before any output: the output folder stays empty
    with pytest.raises(ImageError):
        reg(tmp_path, fixed=fixed, moving=bad, ckpt=ckpt)
    assert _leftovers(tmp_path / "out") == []

    # the disk fills up while the warped PNG is written: only complete files remain
    def partial_then_fail(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", partial_then_fail)
    with pytest.raises(OSError, match="No space left"):
        reg(tmp_path, fixed=fixed, moving=moving, ckpt=ckpt)
    assert _leftovers(tmp_path / "out") == []  # the warped image is written first
