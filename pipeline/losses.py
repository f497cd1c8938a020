"""GAN objectives, computed from D's raw logits (numerically stable: softplus, never log(sigmoid)).

nonsaturating (Goodfellow et al. 2014, the default):
    L_D = -E[log D(x)] - E[log(1 - D(G(z)))] = E[softplus(-d_real)] + E[softplus(d_fake)]
    L_G = -E[log D(G(z))]                    = E[softplus(-d_fake)]
hinge (Miyato et al. 2018):
    L_D = E[relu(1 - d_real)] + E[relu(1 + d_fake)],  L_G = -E[d_fake]
wgan-gp (Gulrajani et al. 2017):
    L_D = E[d_fake] - E[d_real] + lambda * E[(||grad_x D(x_hat)|| - 1)^2],  L_G = -E[d_fake]
R1 (Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?"), an option
for any objective: L_D + gamma/2 * E_x[||grad_x D(x)||^2] on real images, which keeps D from
saturating (D(x) -> 1, D(G(z)) -> 0) and the game from oscillating around its equilibrium.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def d_loss(kind: str, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss without any gradient penalty."""
    if kind == "nonsaturating":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if kind == "hinge":
        return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    if kind == "wgan-gp":
        return d_fake.mean() - d_real.mean()
    raise ValueError(f"unknown loss {kind!r}")


def g_loss(kind: str, d_fake: torch.Tensor) -> torch.Tensor:
    if kind == "nonsaturating":
        return F.softplus(-d_fake).mean()
    if kind in ("hinge", "wgan-gp"):
        return -d_fake.mean()
    raise ValueError(f"unknown loss {kind!r}")


def gradient_penalty(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """E[(||grad D(x_hat)||_2 - 1)^2] at random interpolates x_hat = eps*real + (1-eps)*fake, in fp32.

    `discriminator` must be D's raw module: autograd.grad through the DeepSpeed engine's
    forward would fire its backward hooks outside engine.backward (DeepSpeed #7665).
    loss_scale: see input_gradient."""
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=generator, device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad = input_gradient(discriminator, x_hat, loss_scale)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def r1_penalty(
    discriminator: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, loss_scale: float = 1.0
) -> torch.Tensor:
    """E[||grad_x D(x)||_2^2] over real images x, in fp32. `discriminator` must be D's raw
    module, as for gradient_penalty (DeepSpeed #7665). loss_scale: see input_gradient."""
    real = real.detach().requires_grad_(True)
    return input_gradient(discriminator, real, loss_scale).flatten(1).pow(2).sum(1).mean()


def input_gradient(discriminator: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, loss_scale: float):
    """Each sample's grad_x D(x), in fp32, with a graph for the penalty's own backward.

    In fp16 these gradients underflow unless they are taken scaled: as torch's AMP recipe for
    gradient penalties does (https://pytorch.org/docs/stable/notes/amp_examples.html, "Gradient
    penalty"), the gradient is taken of the scaled mean, at the loss scale the backward of
    the D loss uses (so it overflows exactly when that backward would), and unscaled in fp32."""
    scaled = discriminator(x).float().mean() * loss_scale  # each sample's gradient is scaled by loss_scale / N
    (grad,) = torch.autograd.grad(scaled, x, create_graph=True)
    return grad.float() * (x.shape[0] / loss_scale)


def d_confidence(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Mean D output for logging (a device scalar): probability for the nonsaturating game, raw score otherwise."""
    values = torch.sigmoid(logits.detach().float()) if kind == "nonsaturating" else logits.detach().float()
    return values.mean()
