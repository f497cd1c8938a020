"""DiffAugment (pipeline/augment.py): each transform does what the authors' code does, is
differentiable, draws only from the generator it is given, and leaves images alone when off."""

import pytest
import torch

from pipeline.augment import diff_augment


def images(n=6, c=3, side=16, seed=0) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_same_generator_state_gives_the_same_transforms_and_none_other_is_touched():
    x = images()
    torch.manual_seed(123)
    global_before = torch.random.get_rng_state()
    a = diff_augment(x, ["translation", "cutout", "color"], torch.Generator().manual_seed(7))
    b = diff_augment(x, ["translation", "cutout", "color"], torch.Generator().manual_seed(7))
    c = diff_augment(x, ["translation", "cutout", "color"], torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), global_before)  # the process's stream is not used
    assert diff_augment(x, [], torch.Generator()) is x


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image moved down dy and right dx pixels, zeros coming in at the edges."""
    out = torch.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_translation_shifts_each_image_by_at_most_an_eighth_with_zeros_coming_in():
    x = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).repeat(32, 1, 1, 1) + 1
    out = diff_augment(x, ["translation"], torch.Generator().manual_seed(0))
    found = set()
    for image in out[:, 0]:
        shifts = [
            (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(image, shifted(x[0, 0], dy, dx))
        ]
        assert len(shifts) == 1  # 16 * 0.125 = 2 pixels at most, either way
        found.add(shifts[0])
    assert len(found) > 5  # drawn per image, not per batch


def test_cutout_zeroes_one_square_of_half_the_side_clipped_to_the_image():
    x = torch.ones(64, 1, 16, 16)
    out = diff_augment(x, ["cutout"], torch.Generator().manual_seed(0))
    for image in out[:, 0]:
        holes = (image == 0).nonzero()
        height = holes[:, 0].max() - holes[:, 0].min() + 1
        width = holes[:, 1].max() - holes[:, 1].min() + 1
        assert len(holes) == height * width and height <= 8 and width <= 8  # one rectangle, at most 8x8
    assert (out[:, 0] == 0).sum(dim=(1, 2)).eq(64).sum() > 10  # many whole squares inside the image


def test_color_moves_brightness_saturation_and_contrast_per_image():
    x = images(n=64)
    out = diff_augment(x, ["color"], torch.Generator().manual_seed(0))
    shift = (out - x).mean(dim=(1, 2, 3))
    assert shift.std() > 0.1 and shift.abs().max() < 1.5  # brightness: U(-0.5, 0.5) per image, then rescaled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_flow_through_every_transform(dtype):
    x = images().to(dtype).requires_grad_(True)
    out = diff_augment(x, ["translation", "cutout", "color"], torch.Generator().manual_seed(0))
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad.float()).all()


def test_the_trainer_augments_what_d_sees_from_its_step_generator(dist_single, mnist_shards, tmp_path):
    from pipeline.config import load_config
    from pipeline.train import Trainer
    from tests.conftest import train_overrides

    config = load_config(None, train_overrides(mnist_shards, tmp_path, "train.augment=[translation,cutout]"))
    trainer = Trainer(config, dist_single, tmp_path / "run")
    x = images(n=4, c=1, side=32)
    state = trainer.rng.get_state()
    seen = trainer.d_input(x)
    assert not torch.equal(seen, x) and not torch.equal(trainer.rng.get_state(), state)
    trainer.rng.set_state(state)
    assert torch.equal(trainer.d_input(x), seen)
    assert torch.equal(diff_augment(x, ["translation", "cutout"], torch.Generator().set_state(state)), seen)
