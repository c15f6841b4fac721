"""One preprocessing record: every data config maps to the ``Preprocessing`` its data module
applies, older records read as they trained, padding round-trips a flow exactly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from test_folder_data import png_folder

from air_reg.data import FolderDataModule, PairDataModule
from air_reg.data.preprocess import Preprocessing, pad_offsets
from air_reg.errors import ConfigError
from air_reg.eval import _check_preprocessing
from air_reg.images import ImageError

FOLDER = "air_reg.data.FolderDataModule"


@pytest.mark.parametrize("data", ["mnist", "fashion", "synthetic", "folder", "brain"])
def test_every_data_config_records_what_its_data_module_applies(tmp_path, data):
    path = [f"data.path={tmp_path}"] if data == "folder" else []
    cfg = compose_config("train", [f"data={data}", *path], tmp_path)
    record = OmegaConf.to_container(cfg.data, resolve=True)  # what a checkpoint stores
    assert instantiate(cfg.data).preprocessing == Preprocessing.of(record)
    want = {
        "mnist": Preprocessing(sizing="resize", size=(28, 28)),
        "fashion": Preprocessing(sizing="resize", size=(28, 28)),
        "synthetic": Preprocessing(sizing="resize", size=(28, 28)),
        "folder": Preprocessing(normalize="minmax"),
        "brain": Preprocessing(sizing="resize", size=(112, 96)),
    }[data]
    assert Preprocessing.of(record) == want


@pytest.mark.parametrize(
    ("record", "want"),
    [  # records as checkpoints before the Preprocessing record stored them
        ({"_target_": "air_reg.data.PairDataModule", "dataset": "mnist", "image_size": 28},
         Preprocessing(sizing="resize", size=(28, 28))),
        ({"_target_": FOLDER, "normalize": "percentile", "percentiles": [2, 98],
          "image_size": [24, 32], "pad_to": 8},  # train recorded the padded size
         Preprocessing("percentile", (2.0, 98.0), "pad", (24, 32), 8)),
        ({"_target_": FOLDER, "normalize": "none", "image_size": [112, 96], "pad_to": None},
         Preprocessing("none", (1.0, 99.0), "resize", (112, 96))),
        (None, Preprocessing()),  # model-free: [0, 1] images as they are
    ],
    ids=["idx", "folder-pad", "folder-resize", "model-free"],
)  # fmt: skip
def test_older_records_read_as_they_trained(record, want):
    assert Preprocessing.of(record) == want


def test_a_padded_model_is_evaluated_on_padded_images(tmp_path):
    """The stored record (pad_to and the padded image_size) rebuilds the same padded data."""
    root = png_folder(tmp_path / "a", n=4)
    Image.fromarray(np.full((18, 26), 200, np.uint8)).save(root / "small.png")
    Image.fromarray(np.zeros((18, 26), np.uint8)).save(root / "labels" / "small.png")
    trained = FolderDataModule(path=str(root), pad_to=8)
    rebuilt = FolderDataModule(path=str(root), pad_to=8, image_size=list(trained.image_size))
    assert trained.image_size == rebuilt.image_size == (24, 32)
    assert torch.equal(trained._data["images"], rebuilt._data["images"])
    with pytest.raises(ImageError, match=r"20x28, larger than the 16x16 .* crop or downsample"):
        _ = FolderDataModule(path=str(root), pad_to=8, image_size=[16, 16])._data


@pytest.mark.parametrize(("h", "w"), [(20, 28), (19, 27), (24, 32)])
def test_padding_then_cropping_gives_back_the_image_and_the_flow(h, w):
    prep = Preprocessing(sizing="pad", size=(24, 32), pad_to=8)
    image = torch.rand(1, 1, h, w)
    padded = prep.to_model(image, (24, 32))
    top, left = pad_offsets((h, w), (24, 32))
    assert padded.shape == (1, 1, 24, 32)
    assert padded.sum() == pytest.approx(image.sum().item())  # zeros around, nothing resampled
    assert torch.equal(padded[..., top : top + h, left : left + w], image)
    flow = torch.randn(1, 2, 24, 32)
    assert torch.equal(prep.from_model(flow, (h, w)), flow[..., top : top + h, left : left + w])


def test_resizing_scales_the_flow_back_per_axis():
    prep = Preprocessing(sizing="resize", size=(28, 28))
    assert prep.to_model(torch.rand(2, 1, 56, 84), (28, 28)).shape == (2, 1, 28, 28)
    back = prep.from_model(torch.ones(1, 2, 28, 28), (56, 84))
    assert torch.allclose(back[0, 0], torch.full((56, 84), 2.0))  # rows x2
    assert torch.allclose(back[0, 1], torch.full((56, 84), 3.0))  # columns x3


def test_normalisation_names_the_file_and_the_fix(tmp_path):
    image = np.linspace(0, 300, 12, dtype=np.float32).reshape(3, 4)
    assert Preprocessing("minmax").normalise(image, "x").max() == 1
    with pytest.raises(ImageError, match=r"x.npy: values lie in \[0, 300\].*rescale the image"):
        Preprocessing().normalise(image, tmp_path / "x.npy")


@pytest.mark.parametrize(
    "kwargs",
    [{"normalize": "zscore"}, {"percentiles": (99, 1)}, {"sizing": "crop"},
     {"sizing": "resize"}, {"sizing": "pad"}, {"pad_to": 0}],
)  # fmt: skip
def test_settings_that_cannot_work_are_refused(kwargs):
    with pytest.raises(ConfigError):
        Preprocessing(**kwargs)


def test_idx_data_are_resized_through_the_record():
    dm = PairDataModule(dataset="mnist", image_size=14)
    assert dm.preprocessing == Preprocessing(sizing="resize", size=(14, 14))


@pytest.mark.parametrize(
    ("given", "fix"),
    [(Preprocessing("minmax", sizing="pad", pad_to=8), "data.normalize=percentile"),
     (Preprocessing("percentile", (1, 99), "pad", pad_to=8), "data.percentiles=[2.0,98.0]"),
     (Preprocessing("percentile", (2, 98), "resize", (24, 32)), "data.pad_to=8")],
)  # fmt: skip
def test_eval_refuses_a_data_config_that_preprocesses_otherwise(given, fix):
    trained = Preprocessing("percentile", (2.0, 98.0), "pad", (24, 32), 8)
    _check_preprocessing(trained, trained)
    with pytest.raises(ConfigError, match=rf"add {re.escape(fix)}, or leave data= out"):
        _check_preprocessing(given, trained)
    if "pad_to" not in fix:  # data that read no files are [0, 1] as they are: no normalising
        _check_preprocessing(given, trained, reads_files=False)
