"""Fuzzing the file readers: random and mutated files give a result or the project's own error.

``read_image``, ``read_array``, ``read_checkpoint`` and ``load_model`` get random bytes,
mutated copies of small valid files (flipped, inserted, deleted bytes; headers; every
truncation length class) and wrong structures. Each must return a valid result or raise a
``UserError`` whose one-line message names the file: never another exception, never a hang,
never code from the file. ``AIR_REG_FUZZ=long`` (``make test-all``) runs 20x the examples with
fresh random seeds; the default profile is derandomized, so CI sees the same examples.
"""

from __future__ import annotations

import gzip
import os
import pickle
import signal
import zipfile
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import air_reg
from air_reg.checkpoint import WEIGHTS_DIR, read_checkpoint
from air_reg.data.readers import read_array
from air_reg.errors import UserError
from air_reg.images import PIL_SUFFIXES, ImageError, read_image

SCALES = {"default": 1, "long": 20}
PROFILE = os.environ.get("AIR_REG_FUZZ", "default")
if PROFILE not in SCALES:
    raise ValueError(f"AIR_REG_FUZZ must be one of {sorted(SCALES)} or unset, got {PROFILE!r}")
settings.register_profile(
    "air-reg-fuzz-default",
    deadline=None,  # file readers' times vary with the input: no flaky deadlines
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "air-reg-fuzz-long", settings.get_profile("air-reg-fuzz-default"), derandomize=False
)
WATCHDOG_S = 20  # one read that takes longer counts as a hang
pytestmark = [  # libraries warn about the corrupt files they are fed: expected here
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def fuzz(examples: int):
    """The active profile with ``examples`` (x 20 under ``AIR_REG_FUZZ=long``), marked slow."""
    profile = settings(
        settings.get_profile(f"air-reg-fuzz-{PROFILE}"), max_examples=examples * SCALES[PROFILE]
    )
    return lambda test: pytest.mark.slow(profile(test))


# ---- valid seeds, built in memory ------------------------------------------------------------
def _pil(array: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    image = Image.fromarray(array)
    image = image.convert(mode) if mode else image
    buf = BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = BytesIO()
    np.save(buf, array, allow_pickle=True)  # object arrays pickle: the readers must refuse
    return buf.getvalue()


def _nifti(array: np.ndarray, gz: bool) -> bytes:
    import nibabel

    raw = nibabel.Nifti1Image(array, np.eye(4)).to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def _pages(gray: np.ndarray) -> bytes:
    buf = BytesIO()
    first, *rest = (Image.fromarray(gray + k) for k in range(3))
    first.save(buf, format="TIFF", save_all=True, append_images=rest)
    return buf.getvalue()


GRAY = (np.arange(64).reshape(8, 8) * 3).astype(np.uint8)
RGB = np.stack([GRAY, GRAY[::-1], GRAY.T], axis=-1)
UNIT = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
IMAGE_SEEDS = {  # name: (suffix, bytes); read_image reads these suffixes
    "png-gray": (".png", _pil(GRAY, "PNG")),
    "png-rgb": (".png", _pil(RGB, "PNG")),
    "png-16bit": (".png", _pil(GRAY.astype(np.uint16) * 257, "PNG")),
    "png-palette": (".png", _pil(RGB, "PNG", "P")),
    "jpeg-gray": (".jpg", _pil(np.kron(GRAY, np.ones((2, 2), np.uint8)), "JPEG")),
    "jpeg-rgb": (".jpeg", _pil(RGB, "JPEG")),
    "tiff-gray": (".tif", _pil(GRAY, "TIFF")),
    "tiff-float": (".tiff", _pil(UNIT, "TIFF")),
    "tiff-lzw": (".tif", _pil(GRAY, "TIFF", compression="tiff_lzw")),
    "tiff-pages": (".tif", _pages(GRAY)),
    "npy-uint8": (".npy", _npy(GRAY)),
    "npy-uint16": (".npy", _npy(GRAY.astype(np.uint16) * 257)),
    "npy-float32": (".npy", _npy(UNIT)),
    "npy-bool": (".npy", _npy(GRAY > 90)),
    "npy-big-endian": (".npy", _npy(GRAY.astype(">u2"))),
    "npy-fortran": (".npy", _npy(np.asfortranarray(UNIT))),
    "npy-float64-255": (".npy", _npy(GRAY.astype(np.float64))),  # out of [0, 1]
    "npy-int64": (".npy", _npy(GRAY.astype(np.int64))),
    "npy-complex": (".npy", _npy(UNIT.astype(np.complex64))),
    "npy-3d": (".npy", _npy(np.stack([GRAY, GRAY]))),
    "npy-1d": (".npy", _npy(GRAY.ravel())),
    "npy-empty": (".npy", _npy(np.zeros((0, 8), np.uint8))),
    "npy-object": (".npy", _npy(np.array([[1, "a"]], dtype=object))),
    "npz": (".npy", (lambda b: (np.savez(b, a=GRAY), b.getvalue())[1])(BytesIO())),
}
try:
    NIFTI_SEEDS = {
        "nifti-2d": (".nii", _nifti(GRAY.astype(np.int16), gz=False)),
        "nifti-3d": (".nii", _nifti(np.stack([UNIT, UNIT, UNIT], -1), gz=False)),
        "nifti-3d-gz": (".nii.gz", _nifti(np.stack([GRAY, GRAY], -1), gz=True)),
    }
except ImportError:  # nibabel is the optional [nifti] extra
    NIFTI_SEEDS = {}
ARRAY_SEEDS = {**IMAGE_SEEDS, **NIFTI_SEEDS}  # read_array also reads NIfTI
MAGIC = {
    ".png": b"\x89PNG\r\n\x1a\n",
    ".jpg": b"\xff\xd8\xff",
    ".jpeg": b"\xff\xd8\xff\xe0",
    ".tif": b"II*\x00",
    ".tiff": b"MM\x00*",
    ".npy": b"\x93NUMPY\x01\x00",
    ".nii": (348).to_bytes(4, "little"),
    ".nii.gz": b"\x1f\x8b\x08\x00",
}
CKPT_BYTES = (WEIGHTS_DIR / "air_mnist.ckpt").read_bytes()
CKPT = torch.load(BytesIO(CKPT_BYTES), map_location="cpu", weights_only=True)


# ---- mutations ---------------------------------------------------------------------------------
INT32S = [b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x80", b"\x00\x01\x00\x00"]


@st.composite
def mutated(draw, data: bytes, spans: tuple[tuple[int, int], ...] = ()) -> bytes:
    """``data`` with 1-4 edits, each in the header (first 64 bytes), anywhere, or ``spans``."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        lo, hi = draw(st.sampled_from([(0, 64), (0, len(out)), *spans]))
        hi = max(min(hi, len(out)), lo + 1)
        pos = min(draw(st.integers(lo, hi - 1)), len(out) - 1)
        op = draw(st.sampled_from(["flip", "set", "int32", "insert", "delete", "truncate"]))
        if op == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif op == "int32":
            out[pos : pos + 4] = draw(st.sampled_from(INT32S))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 16))]
        else:
            del out[pos:]
    return bytes(out)


def cut_points(n: int) -> list[int]:
    """Truncation lengths of every class: each of the first 96, 32 fractions, the last 16."""
    return sorted({*range(1, min(n, 96)), *(n * k // 32 for k in range(1, 32)), *range(n)[-16:]})


# ---- the properties ------------------------------------------------------------------------
class Hang(BaseException):  # not an Exception: the readers' own handlers must not catch it
    pass


@contextmanager
def guarded(seconds: float = WATCHDOG_S):
    """Raise ``Hang`` after ``seconds``; cap the address space at 6 GiB above today's (Linux),
    so a reader that allocates wildly fails here instead of exhausting the machine."""

    def _raise(signum, frame):
        raise Hang

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    limits = None
    try:
        import resource

        limits = resource.getrlimit(resource.RLIMIT_AS)
        used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
        cap = used + 6 * 2**30
        if limits[1] == resource.RLIM_INFINITY or cap < limits[1]:
            resource.setrlimit(resource.RLIMIT_AS, (cap, limits[1]))
    except (ImportError, OSError, ValueError):
        limits = None
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if limits is not None:
            resource.setrlimit(resource.RLIMIT_AS, limits)


def _out_of_memory(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MemoryError) or "can't allocate memory" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def outcome(call, path: Path, errors: type[BaseException] = ImageError):
    """``call(path)``'s result, or None after an ``errors`` with a clear message; else fails."""
    try:
        with guarded():
            return call(path)
    except Hang:
        pytest.fail(f"{call.__name__}({path.name}) took more than {WATCHDOG_S} s")
    except errors as err:
        error = err
    assert not _out_of_memory(error), f"{call.__name__} tried to allocate > 6 GiB: {error}"
    message = str(error)
    assert message.strip(), f"{type(error).__name__} with an empty message"
    assert "\n" not in message, message
    if isinstance(error, ImageError | air_reg.CheckpointError):
        assert path.name in message, f"{path.name} not named in {message!r}"
    return None


def check_image(path: Path) -> None:
    image = outcome(read_image, path)
    if image is not None:
        assert isinstance(image, torch.Tensor), type(image)
        assert image.dtype == torch.float32, image.dtype
        assert image.ndim == 4, image.shape
        assert image.shape[:2] == (1, 1), image.shape
        assert min(image.shape) >= 1, image.shape
        assert torch.isfinite(image).all()
        assert 0 <= image.min() <= image.max() <= 1


def check_array(path: Path) -> None:
    array = outcome(read_array, path)
    if array is not None:
        assert isinstance(array, np.ndarray), type(array)
        assert array.dtype == np.float32, array.dtype
        assert array.ndim in (2, 3), array.shape
        assert min(array.shape) >= 1, array.shape
        assert np.isfinite(array).all()


def check_readers(folder: Path, suffix: str, data: bytes) -> None:
    path = folder / f"fuzzed{suffix}"
    path.write_bytes(data)
    if suffix in (*PIL_SUFFIXES, ".npy"):
        check_image(path)
    check_array(path)


def check_checkpoint(folder: Path, data: bytes) -> None:
    path = folder / "fuzzed.ckpt"
    path.write_bytes(data)
    outcome(read_checkpoint, path, air_reg.CheckpointError)
    model = outcome(air_reg.load_model, path, UserError)
    if model is not None:
        assert isinstance(model, torch.nn.Module), type(model)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---- image files -------------------------------------------------------------------------------
@fuzz(200)
@given(suffix=st.sampled_from(sorted(MAGIC)), magic=st.booleans(), body=st.binary(max_size=2048))
def test_random_bytes_are_read_or_refused_clearly(folder, suffix, magic, body):
    if suffix.startswith(".nii") and not NIFTI_SEEDS:
        return  # no nibabel: read_array's "needs nibabel" error is checked elsewhere
    check_readers(folder, suffix, (MAGIC[suffix] if magic else b"") + body)


@fuzz(1000)
@given(seed=st.sampled_from(sorted(ARRAY_SEEDS)), data=st.data())
def test_mutated_image_files_are_read_or_refused_clearly(folder, seed, data):
    suffix, valid = ARRAY_SEEDS[seed]
    check_readers(folder, suffix, data.draw(mutated(valid), label="file"))


@pytest.mark.parametrize("seed", sorted(ARRAY_SEEDS))
def test_every_truncation_of_a_valid_image_is_refused_clearly(folder, seed):
    suffix, valid = ARRAY_SEEDS[seed]
    for n in cut_points(len(valid)):
        check_readers(folder, suffix, valid[:n])


def _png_ihdr(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return MAGIC[".png"] + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _npy_header(shape: tuple[int, ...]) -> bytes:
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return MAGIC[".npy"] + len(header).to_bytes(2, "little") + header + b"\x00" * 64


def _nifti_dims(dims: tuple[int, ...], gz: bool) -> bytes:
    header = bytearray(_nifti(GRAY.astype(np.int16), gz=False)[:352])
    header[40:56] = np.array([len(dims), *dims, *[1] * (7 - len(dims))], "<i2").tobytes()
    return gzip.compress(bytes(header)) if gz else bytes(header)


HUGE = [  # (suffix, a small file whose header claims an enormous image)
    pytest.param(".png", _png_ihdr(2**31 - 1, 2**31 - 1), id="png-2^62-pixels"),
    pytest.param(".png", _png_ihdr(20000, 20000), id="png-400M-pixels"),
    pytest.param(".npy", _npy_header((2**40, 2**40)), id="npy-2^80"),
    pytest.param(".npy", _npy_header((2**31, 2**31, 2**31)), id="npy-3d-2^93"),
    pytest.param(".npy", _npy_header((30000, 30000)), id="npy-900M"),
]
if NIFTI_SEEDS:
    HUGE += [
        pytest.param(".nii", _nifti_dims((32767, 32767, 32767), gz=False), id="nii-2^45"),
        pytest.param(".nii.gz", _nifti_dims((32767, 32767, 4096), gz=True), id="nii-gz-2^42"),
    ]


@pytest.mark.parametrize(("suffix", "data"), HUGE)
def test_headers_claiming_huge_images_are_refused_without_allocating(folder, suffix, data):
    path = folder / f"huge{suffix}"
    path.write_bytes(data)
    readers = [read_array] if suffix.startswith(".nii") else [read_image, read_array]
    for reader in readers:
        with guarded(5), pytest.raises(ImageError) as info:
            reader(path)
        assert path.name in str(info.value)


@pytest.mark.parametrize("seed", ["png-gray", "tiff-gray", "npy-uint8", "nifti-3d"])
def test_files_above_the_size_limit_are_refused_before_reading(folder, seed, monkeypatch):
    if seed not in ARRAY_SEEDS:
        pytest.skip("nibabel is not installed")
    monkeypatch.setattr("air_reg.images.MAX_PIXELS", 63)  # the seeds hold 64 values or more
    suffix, valid = ARRAY_SEEDS[seed]
    path = folder / f"big{suffix}"
    path.write_bytes(valid)
    for reader in [read_array] if suffix == ".nii" else [read_image, read_array]:
        with pytest.raises(ImageError, match=r"too large: .*more than air-reg reads \(63\)"):
            reader(path)


# ---- checkpoints ---------------------------------------------------------------------------
ARCHIVE = zipfile.ZipFile(BytesIO(CKPT_BYTES))
ENTRIES = sorted(name.split("/", 1)[1] for name in ARCHIVE.namelist())  # "data.pkl", ...
PKL_INFO = next(i for i in ARCHIVE.infolist() if i.filename.endswith("/data.pkl"))
PKL = ARCHIVE.read(PKL_INFO)
PKL_START = PKL_INFO.header_offset + 30 + len(PKL_INFO.filename) + len(PKL_INFO.extra)
CENTRAL = CKPT_BYTES.rfind(b"PK\x01\x02", 0, CKPT_BYTES.rfind(b"PK\x05\x06"))
SPANS = ((PKL_START, PKL_START + len(PKL)), (CENTRAL - 4096, len(CKPT_BYTES)))  # pickle, index


def rezip(edits: dict[str, bytes | None]) -> bytes:
    """The shipped checkpoint with entries replaced (``bytes``) or dropped (``None``)."""
    buf = BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in ARCHIVE.infolist():
            data = edits.get(info.filename.split("/", 1)[1], ARCHIVE.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
    return buf.getvalue()


def saved(obj) -> bytes:
    buf = BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _paths(node, prefix=()) -> list[tuple]:
    """Key paths into a nested dict (the checkpoint), leaves and inner nodes."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    return out


PATHS = _paths(CKPT)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(-2, 40), max_size=3),
    st.dictionaries(
        st.sampled_from(["_target_", "net", "a"]), st.integers() | st.text(), max_size=2
    ),
    st.lists(st.integers(0, 5), max_size=3).map(lambda shape: torch.zeros(shape)),
)


@fuzz(150)
@given(
    prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95"]), body=st.binary()
)
def test_random_bytes_are_not_a_checkpoint(folder, prefix, body):
    check_checkpoint(folder, prefix + body)


@fuzz(300)
@given(data=st.data())
def test_mutated_checkpoints_load_or_are_refused_clearly(folder, data):
    check_checkpoint(folder, data.draw(mutated(CKPT_BYTES, SPANS), label="file"))


@fuzz(200)
@given(pkl=mutated(PKL), dropped=st.sets(st.sampled_from(ENTRIES), max_size=2))
def test_archives_with_a_mutated_pickle_or_missing_entries_are_refused(folder, pkl, dropped):
    check_checkpoint(folder, rezip({"data.pkl": pkl, **dict.fromkeys(dropped)}))


def _edited(path: tuple, value, more: list | tuple = ()) -> dict:
    """The shipped checkpoint with ``value`` at ``path`` (``DROP``: deleted), then the
    (path, value) edits ``more``; one below a value an earlier edit replaced is skipped."""
    ckpt = {**CKPT, "air_reg": pickle.loads(pickle.dumps(CKPT["air_reg"]))}
    ckpt["state_dict"] = dict(CKPT["state_dict"])
    for where, new in [(path, value), *more]:
        node = ckpt
        for key in where[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if new is DROP:
            node.pop(where[-1], None)
        else:
            node[where[-1]] = new
    return ckpt


DROP = object()
EDIT = st.tuples(st.sampled_from(PATHS), JUNK | st.just(DROP))


@fuzz(300)
@given(edits=st.lists(EDIT, min_size=1, max_size=3))
def test_checkpoints_with_wrong_values_load_or_are_refused_clearly(folder, edits):
    check_checkpoint(folder, saved(_edited(*edits[0], edits[1:])))


# ---- wrong structures and code in a checkpoint -----------------------------------------------
def _net(**changes) -> dict:
    """The shipped checkpoint with its network config changed."""
    return _edited(("air_reg", "model", "net"), {**CKPT["air_reg"]["model"]["net"], **changes})


def _nested(depth: int) -> dict:
    node: dict = {}
    for _ in range(depth):
        node = {"a": node}
    return node


def _loop() -> dict:
    node: dict = {"_target_": "air_reg.models.components.air.AiR"}
    node["self"] = node
    return node


SD = CKPT["state_dict"]
WRONG = {
    "not-a-dict": [1, 2],
    "a-tensor": torch.zeros(3),
    "no-state-dict": {"air_reg": CKPT["air_reg"]},
    "net-is-an-int": {"state_dict": {}, "air_reg": {"model": {"net": 3}}},
    "model-is-a-list": {"state_dict": {}, "air_reg": {"model": [1]}},
    "record-is-a-list": {"state_dict": {}, "air_reg": [1]},
    "state-dict-is-a-list": {"state_dict": [1], "air_reg": CKPT["air_reg"]},
    "int-keys": {**CKPT, "state_dict": dict(enumerate(SD.values()))},
    "target-not-a-string": _net(_target_=3),
    "target-a-list": _net(_target_=["air_reg.models.components.air.AiR"]),
    "target-not-importable": _net(_target_="air_reg.models.components.nope.Net"),
    "values-not-tensors": {**CKPT, "state_dict": dict.fromkeys(SD, 0.5)},
    "wrong-shapes": {**CKPT, "state_dict": {k: v[..., :1] for k, v in SD.items()}},
    "int-weights": {**CKPT, "state_dict": {k: v.long() for k, v in SD.items()}},
    "partial-net": _net(_partial_=True),
    "image-size-negative": _net(image_size=-3),
    "image-size-a-string": _net(image_size="abc"),
    "dim-huge": _net(dim=10**9),
    "depth-huge": _net(depth=10**9),
    "image-size-huge": _net(image_size=10**6),
    "image-size-70765201": _net(image_size=70765201),  # patch 2 fails: divisors listed
    "dim-and-depth-1000": _net(dim=1000, depth=1000),  # small ints, ~28 G values
    "heads-zero": _net(heads=0),
    "unknown-argument": _net(colour="red"),
    "legacy-key-a-tensor": _net(fast_dropout=torch.zeros(0), attn_kernel=[1]),
    "speed-a-tensor": _edited(("air_reg", "speed"), torch.ones(3)),
    "target-a-newline": _edited(("air_reg", "model", "reg_weight"), {"_target_": "\n"}),
    "key-with-a-newline": _edited(("air_reg", "model", "a\nb"), {"_target_": "os.system"}),
    "nested-200-deep": _edited(("air_reg", "model", "extra"), _nested(200)),
    "reference-loop": _edited(("air_reg", "model", "net"), _loop()),
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_checkpoints_with_a_wrong_structure_load_or_are_refused_clearly(folder, name):
    check_checkpoint(folder, saved(WRONG[name]))


class _Shell:  # pickles to a call of os.system
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _code(marker: Path) -> dict[str, bytes]:
    """Checkpoint files that would create ``marker`` if anything in them ran."""
    touch = f"touch {marker}"
    protocol0 = f"cos\nsystem\n(S'{touch}'\ntR.".encode()

    def target(net) -> bytes:
        return saved({"state_dict": {}, "air_reg": {"model": {"net": net}}})

    save_npy = "air_reg.images.save_npy"
    return {
        "legacy-pickle": protocol0,
        "zip-pickle": rezip({"data.pkl": protocol0}),
        "reduce-in-record": rezip({"data.pkl": pickle.dumps({"air_reg": _Shell(touch)}, 2)}),
        "reduce-as-file": pickle.dumps(_Shell(touch), 4),
        "target-os-system": target({"_target_": "os.system", "_args_": [touch]}),
        "target-exec": target({"_target_": "builtins.exec", "_args_": [f"open('{marker}','w')"]}),
        "target-trusted-function": target({"_target_": save_npy, "_args_": [str(marker), [1]]}),
        "nested-trusted-function": saved(
            _net(image_size={"_target_": save_npy, "path": str(marker), "array": [1]})
        ),
    }


CODE = sorted(_code(Path("m")))


@pytest.mark.parametrize("name", CODE)
def test_code_in_a_checkpoint_never_runs(folder, name):
    marker = folder / f"pwned-{name}"
    path = folder / f"{name}.ckpt"
    path.write_bytes(_code(marker)[name])
    outcome(air_reg.load_model, path, UserError)
    assert not marker.exists(), f"loading {name} ran code from the file"
