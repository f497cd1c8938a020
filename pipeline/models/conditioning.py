"""What makes a network class-conditional (model.conditional), for the DCGAN and the MLP alike.

G: class-conditional BatchNorm (de Vries et al. 2017, "Modulating early visual processing by
language"; as in Miyato & Koyama 2018's generator): a BatchNorm without its own affine whose
scale and shift are looked up per class.
D: the projection discriminator (Miyato & Koyama 2018, "cGANs with Projection Discriminator"):
D(x, y) = psi(phi(x)) + <embed(y), sum_hw phi(x)>, phi(x) D's last features, psi its plain head.

Without classes (num_classes 0) each network is the unconditional one, with the same state dict
keys, so checkpoints and exports made before conditioning load as they did.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassBatchNorm(nn.Module):
    """BatchNorm(x) * gain[y] + bias[y]. Initialised like the DCGAN's BatchNorm affine:
    gains N(1, 0.02), biases 0, so at step 0 every class starts from the same network."""

    def __init__(self, features: int, num_classes: int, dims: int = 2):
        super().__init__()
        self.norm = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(features, affine=False)
        self.gain = nn.Embedding(num_classes, features)
        self.bias = nn.Embedding(num_classes, features)
        nn.init.normal_(self.gain.weight, 1.0, 0.02)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)
        return self.norm(x) * self.gain(labels).view(shape) + self.bias(labels).view(shape)


def batch_norm(features: int, num_classes: int, dims: int = 2) -> nn.Module:
    """G's normalisation: the plain BatchNorm without classes, ClassBatchNorm with them."""
    if num_classes:
        return ClassBatchNorm(features, num_classes, dims)
    return nn.BatchNorm2d(features) if dims == 2 else nn.BatchNorm1d(features)


class Conditioned(nn.Sequential):
    """A Sequential that hands the labels to the layers that take them (ClassBatchNorm). Its
    state dict keys are nn.Sequential's."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x, labels) if isinstance(layer, ClassBatchNorm) else layer(x)
        return x


def check_labels(num_classes: int, labels: torch.Tensor | None) -> None:
    """A conditional network needs a class per sample; an unconditional one takes none."""
    if num_classes and labels is None:
        raise ValueError(f"this network is class-conditional ({num_classes} classes): pass the labels")
    if not num_classes and labels is not None:
        raise ValueError("this network is unconditional: it takes no labels")


def projection(embedding: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """<embed(y), sum over positions of phi(x)>, one value per sample (Miyato & Koyama 2018, eq. 3)."""
    pooled = features.flatten(2).sum(2) if features.dim() > 2 else features
    return (embedding(labels) * pooled).sum(1)


class ProjectionDiscriminator(nn.Module):
    """Both discriminators' forward: `self.net` (a Sequential whose last layer is the plain head
    psi, one logit) and, with classes, `self.embed` from `add_class_embedding`."""

    num_classes = 0

    def add_class_embedding(self, num_classes: int, width: int, wrap=lambda module: module) -> None:
        """One embedding row per class, as wide as D's last features; wrap: D's normalisation
        of its weights (spectral norm, as Miyato & Koyama normalise theirs)."""
        self.num_classes = num_classes
        if num_classes:
            embed = nn.Embedding(num_classes, width)
            nn.init.normal_(embed.weight, 0.0, 0.02)
            self.embed = wrap(embed)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_labels(self.num_classes, labels)
        if not self.num_classes:
            return self.net(x).flatten()
        features = self.net[:-1](x)
        return self.net[-1](features).flatten() + projection(self.embed, features, labels)


def class_labels(num_classes: int, n: int, chosen: int | None = None, start: int = 0) -> torch.Tensor | None:
    """The labels of images start..start+n-1 of a sample: None for an unconditional generator;
    `chosen` for each; otherwise the classes in turn (image i gets class i mod C), so a sample
    is class-balanced however it is cut into chunks."""
    if not num_classes:
        if chosen is not None:
            raise ValueError("this generator is unconditional: it has no classes to choose from")
        return None
    if chosen is not None:
        if not 0 <= chosen < num_classes:
            raise ValueError(f"class {chosen} is outside this generator's classes 0-{num_classes - 1}")
        return torch.full((n,), chosen, dtype=torch.long)
    return torch.arange(start, start + n) % num_classes
