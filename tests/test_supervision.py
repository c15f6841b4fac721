"""What the training loss compares (``RegistrationModule(supervision=...)``): images, label
maps or the true flow; and the losses that go with labels and fields."""

from __future__ import annotations

import pytest
import torch

from air_reg.errors import ConfigError
from air_reg.losses import MSE, EndPointError, SoftDice
from air_reg.models.components.dirnet import DIRNet
from air_reg.models.registration_module import RegistrationModule


def system(supervision: str, loss) -> RegistrationModule:
    return RegistrationModule(net=DIRNet(image_size=16), loss=loss, optimizer=torch.optim.Adam,
                              supervision=supervision)  # fmt: skip


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, 4, (2, 1, 16, 16), generator=g)
    image = lambda: torch.rand(2, 1, 16, 16, generator=g)  # noqa: E731
    return {"fixed": image(), "moving": image(), "flow": torch.randn(2, 2, 16, 16, generator=g),
            "fixed_labels": labels, "moving_labels": labels.clone()}  # fmt: skip


def test_field_supervision_is_the_end_point_error_to_the_true_flow():
    b, flow = batch(), torch.randn(2, 2, 16, 16)
    out = system("field", EndPointError()).objective(b["fixed"], b["moving"], flow, b)
    want = (flow - b["flow"]).norm(dim=1).mean()
    assert torch.allclose(out["sim"], want, atol=1e-4)


def test_label_supervision_is_zero_for_identical_maps_and_grows_with_the_flow():
    b = batch()
    sys = system("labels", SoftDice())
    still = sys.objective(b["fixed"], b["moving"], torch.zeros(2, 2, 16, 16), b)["sim"]
    moved = sys.objective(b["fixed"], b["moving"], torch.full((2, 2, 16, 16), 2.5), b)["sim"]
    assert still.item() == pytest.approx(0.0, abs=1e-4)
    assert moved.item() > 0.1


def test_unknown_supervision_and_missing_keys_are_one_line_errors():
    with pytest.raises(ConfigError, match="supervision must be one of"):
        system("pixels", MSE())
    b = batch()
    del b["flow"]
    with pytest.raises(ConfigError, match=r"supervision=field needs batches with \['flow'\]"):
        system("field", EndPointError()).objective(
            b["fixed"], b["moving"], torch.zeros(2, 2, 16, 16), b
        )


def test_soft_dice_ignores_labels_absent_from_the_fixed_map():
    fixed = torch.zeros(1, 3, 4, 4)
    fixed[:, 1] = 1  # only label 1 present
    warped = fixed.clone()
    warped[:, 2, 0, 0] = 1  # label 2 appears in the warped map only: no effect
    assert SoftDice()(warped, fixed).item() == pytest.approx(0.0, abs=1e-5)
