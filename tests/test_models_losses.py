"""DCGAN and MLP shapes and initialisation; each loss against a hand-computed value."""

import math

import pytest
import torch
from torch import nn

from pipeline import losses
from pipeline.config import load_config
from pipeline.ema import EMA
from pipeline.export import load_generator, save_generator
from pipeline.images import from_uint8, to_uint8
from pipeline.models import build_pair, mlp
from pipeline.models.dcgan import Discriminator, Generator


@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_depth_follow_resolution(resolution, channels):
    g = Generator(resolution, channels, latent_dim=100, width=8)
    d = Discriminator(resolution, channels, width=8)
    images = g(torch.randn(2, 100))
    assert images.shape == (2, channels, resolution, resolution)
    assert images.abs().max() <= 1  # Tanh output
    assert d(images).shape == (2,)
    stride2 = int(math.log2(resolution)) - 2
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in g.modules()) == stride2 + 1
    assert sum(isinstance(m, nn.Conv2d) for m in d.modules()) == stride2 + 1


def test_reference_layout_no_bn_on_d_input_or_g_output():
    g, d = Generator(64, 3), Discriminator(64, 3)
    assert isinstance(g.net[-1], nn.Tanh) and isinstance(g.net[-2], nn.ConvTranspose2d)
    assert isinstance(d.net[0], nn.Conv2d) and isinstance(d.net[1], nn.LeakyReLU) and d.net[1].negative_slope == 0.2
    assert [m.out_channels for m in g.modules() if isinstance(m, nn.ConvTranspose2d)] == [512, 256, 128, 64, 3]
    assert [m.out_channels for m in d.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 1]


def test_mlp_baseline_is_the_articles_network():
    """Two Dense-256 ReLU layers each; G ends in tanh ([-1, 1] data), D in one linear logit."""
    g, d = build_pair(load_config(None, ["model.arch=mlp", "model.g_width=256", "model.d_width=256"]).model)
    assert isinstance(g, mlp.Generator) and isinstance(d, mlp.Discriminator)
    assert [(m.in_features, m.out_features) for m in g.modules() if isinstance(m, nn.Linear)] == [
        (100, 256),
        (256, 256),
        (256, 32 * 32),
    ]
    assert [(m.in_features, m.out_features) for m in d.modules() if isinstance(m, nn.Linear)] == [
        (32 * 32, 256),
        (256, 256),
        (256, 1),
    ]
    assert isinstance(g.net[-1], nn.Tanh) and isinstance(d.net[-1], nn.Linear)
    images = g(torch.randn(3, 100))
    assert images.shape == (3, 1, 32, 32) and images.abs().max() <= 1
    assert d(images).shape == (3,)


def test_an_mlp_export_loads_back_as_an_mlp(tmp_path):
    model = load_config(None, ["model.arch=mlp", "model.g_width=16"]).model
    generator, _ = build_pair(model)
    save_generator(tmp_path / "g.pt", generator, model, step=7, ema=False)
    loaded, payload = load_generator(tmp_path / "g.pt")
    assert isinstance(loaded, mlp.Generator) and payload["model"]["arch"] == "mlp"
    z = torch.randn(4, 100)
    assert torch.equal(loaded(z), generator.eval()(z))


def test_pixels_survive_the_trip_to_the_model_range_and_back():
    """Every uint8 level maps into [-1, 1] (0 -> -1, 255 -> 1) and back to itself: generated
    images are quantised exactly as real ones, so FID sees no range or rounding offset."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1)
    scaled = from_uint8(levels)
    assert scaled.shape == (1, 1, 16, 16) and scaled.min() == -1 and scaled.max() == 1
    assert torch.equal(to_uint8(scaled), levels)
    assert torch.equal(to_uint8(scaled + 0.49 / 127.5), levels)  # rounding, not truncation


def test_init_follows_the_paper():
    torch.manual_seed(0)
    g, d = Generator(64, 3), Discriminator(64, 3)
    convs = [m.weight for m in [*g.modules(), *d.modules()] if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    weights = torch.cat([w.flatten() for w in convs])
    assert abs(weights.mean()) < 1e-3 and abs(weights.std() - 0.02) < 1e-3
    bns = [m for m in [*g.modules(), *d.modules()] if isinstance(m, nn.BatchNorm2d)]
    gamma = torch.cat([m.weight for m in bns])
    assert abs(gamma.mean() - 1) < 5e-3 and abs(gamma.std() - 0.02) < 5e-3
    assert all(torch.all(m.bias == 0) for m in bns)


def test_spectral_norm_replaces_batchnorm_in_d():
    d = Discriminator(32, 1, width=8, norm="spectral")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert all(hasattr(m, "parametrizations") for m in convs)
    with torch.no_grad():
        for _ in range(30):  # power iteration converges in train mode
            d(torch.randn(2, 1, 32, 32))
    d.eval()
    top = torch.linalg.matrix_norm(convs[1].weight.flatten(1), ord=2)
    assert abs(top - 1) < 0.05


def test_nonsaturating_loss_by_hand():
    d_real, d_fake = torch.tensor([0.0, math.log(3)]), torch.tensor([math.log(3), 0.0])
    # D(x) = sigmoid: 0.5, 0.75; D(G(z)) = 0.75, 0.5
    expected_d = -(math.log(0.5) + math.log(0.75)) / 2 - (math.log(0.25) + math.log(0.5)) / 2
    expected_g = -(math.log(0.75) + math.log(0.5)) / 2
    assert losses.d_loss("nonsaturating", d_real, d_fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert losses.g_loss("nonsaturating", d_fake).item() == pytest.approx(expected_g, rel=1e-6)


def test_losses_stay_finite_for_extreme_logits():
    big = torch.tensor([100.0, -100.0])
    assert math.isfinite(losses.d_loss("nonsaturating", big, -big).item())
    assert losses.g_loss("nonsaturating", torch.tensor([-100.0])).item() == pytest.approx(100.0)


def test_hinge_and_wgan_losses_by_hand():
    d_real, d_fake = torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.0])
    assert losses.d_loss("hinge", d_real, d_fake).item() == pytest.approx((0.5 + 0) / 2 + (0 + 1) / 2)
    assert losses.g_loss("hinge", d_fake).item() == pytest.approx(1.0)
    assert losses.d_loss("wgan-gp", d_real, d_fake).item() == pytest.approx(-1.0 - 1.25)
    assert losses.g_loss("wgan-gp", d_fake).item() == pytest.approx(1.0)


def test_gradient_penalty_of_a_linear_critic():
    w = torch.tensor([3.0, 4.0])  # ||grad|| = 5 everywhere: penalty (5 - 1)^2 = 16

    def critic(x):
        return x.flatten(1) @ w

    real, fake = torch.randn(4, 1, 1, 2), torch.randn(4, 1, 1, 2)
    penalty = losses.gradient_penalty(critic, real, fake, torch.Generator().manual_seed(0))
    assert penalty.item() == pytest.approx(16.0)


def test_r1_penalty_of_a_linear_discriminator():
    w = torch.tensor([3.0, 4.0])  # grad_x D = w at every x: ||grad||^2 = 25

    def discriminator(x):
        return x.flatten(1) @ w

    assert losses.r1_penalty(discriminator, torch.randn(4, 1, 1, 2)).item() == pytest.approx(25.0)

    def quadratic(x):  # D(x) = sum x^2: grad 2x, ||grad||^2 = 4 ||x||^2
        return x.flatten(1).pow(2).sum(1)

    real = torch.randn(3, 1, 2, 2)
    expected = (4 * real.flatten(1).pow(2).sum(1)).mean()
    assert losses.r1_penalty(quadratic, real).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ema_update_by_hand_with_warmup():
    model = nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    ema = EMA(model, decay=0.5)
    model.weight.data.fill_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 1/10) = 0.1: 0 -> 0.9
    assert ema.model.weight.item() == pytest.approx(0.9)
    ema.update(model)  # min(0.5, 2/11): 0.9 -> 0.9 * 2/11 + 9/11
    assert ema.model.weight.item() == pytest.approx(0.9 * 2 / 11 + 9 / 11)
    for _ in range(20):
        ema.update(model)
    assert ema.current_decay() == 0.5
    restored = EMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 22 and torch.equal(restored.model.weight, ema.model.weight)


@pytest.mark.parametrize(("warmup", "first_decays"), [(1, [0.99, 0.99]), (4, [1 / 4, 2 / 5]), (10, [1 / 10, 2 / 11])])
def test_ema_warmup_sets_how_fast_the_average_lengthens(warmup, first_decays):
    """min(decay, (1 + n) / (warmup + n)): 1 is no warm-up; 10 is TensorFlow's (the default)."""
    ema = EMA(nn.Linear(1, 1), decay=0.99, warmup=warmup)
    decays = []
    for _ in range(2):
        decays.append(ema.current_decay())
        ema.update(nn.Linear(1, 1))
    assert decays == pytest.approx(first_decays)
