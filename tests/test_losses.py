import pytest
import torch
import torch.nn.functional as F

from ncrobust.losses import LOSSES, get_loss


def test_mse_is_squared_distance_to_one_hot():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    assert get_loss("mse")(logits, y, reduction="none").tolist() == pytest.approx([0.0, (0.25 + 0.25 + 1.0) / 3])
    assert get_loss("mse")(logits, y).item() == pytest.approx(F.mse_loss(logits, F.one_hot(y, 3).float()).item())


def test_focal_with_gamma_zero_is_cross_entropy_and_smoothing_zero_too():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    ce = F.cross_entropy(logits, y)
    assert get_loss("focal", gamma=0.0)(logits, y).item() == pytest.approx(ce.item(), rel=1e-6)
    assert get_loss("label_smoothing", smoothing=0.0)(logits, y).item() == pytest.approx(ce.item(), rel=1e-6)
    assert get_loss("focal", gamma=2.0)(logits, y) < ce  # focal down-weights easy examples


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_has_per_sample_reduction_and_a_gradient(name):
    logits = torch.randn(8, 4, requires_grad=True)
    y = torch.arange(8) % 4
    per_sample = get_loss(name)(logits, y, reduction="none")
    assert per_sample.shape == (8,)
    per_sample.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_bad_loss_options():
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")
    with pytest.raises(ValueError, match="label smoothing"):
        get_loss("label_smoothing", smoothing=1.5)
    with pytest.raises(ValueError, match="focal gamma"):
        get_loss("focal", gamma=-1)
