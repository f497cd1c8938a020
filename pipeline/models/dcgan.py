"""DCGAN generator and discriminator (Radford et al. 2015, as in the PyTorch DCGAN example).

Resolution r in {32, 64, 128} sets the depth: log2(r) - 2 stride-2 layers between
the 4x4 core and the image. Widths double towards the 4x4 core:
  G: z -> ConvT(4x4, stride 1) -> [ConvT stride 2, BN, ReLU] ... -> ConvT -> Tanh
  D: x -> Conv stride 2, LeakyReLU(0.2) (no BN on the input layer) -> [Conv, BN|SN, LReLU] ... -> Conv(4x4) -> logit
D returns raw logits (N,); the losses apply the sigmoid where they need it, stably.
With num_classes, G's BatchNorms are class-conditional and D has a projection head
(pipeline/models/conditioning.py); both then take the labels as their second argument.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.models.conditioning import Conditioned, ProjectionDiscriminator, batch_norm, check_labels

RESOLUTIONS = (32, 64, 128)


def _depth(resolution: int) -> int:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution}")
    return int(math.log2(resolution)) - 2


def init_dcgan_weights(module: nn.Module) -> None:
    """Conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0 (the paper's init)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:  # a ClassBatchNorm initialises its own
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(
        self, resolution: int = 64, channels: int = 3, latent_dim: int = 100, width: int = 64, num_classes: int = 0
    ):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        depth = _depth(resolution)
        widths = [width * 2 ** (depth - 1 - i) for i in range(depth)]  # 64px: 512, 256, 128, 64
        layers = [
            nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
            batch_norm(widths[0], num_classes),
            nn.ReLU(True),
        ]
        for c_in, c_out in itertools.pairwise(widths):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), batch_norm(c_out, num_classes)]
            layers.append(nn.ReLU(True))
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = Conditioned(*layers)
        init_dcgan_weights(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_labels(self.num_classes, labels)
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1), labels)


class Discriminator(ProjectionDiscriminator):
    def __init__(
        self, resolution: int = 64, channels: int = 3, width: int = 64, norm: str = "batch", num_classes: int = 0
    ):
        super().__init__()
        if norm not in ("batch", "spectral", "none"):
            raise ValueError(f"norm must be batch, spectral or none, got {norm!r}")
        depth = _depth(resolution)
        widths = [width * 2**i for i in range(depth)]  # 64px: 64, 128, 256, 512
        wrap = spectral_norm if norm == "spectral" else (lambda m: m)
        layers = [wrap(nn.Conv2d(channels, widths[0], 4, 2, 1, bias=False)), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in itertools.pairwise(widths):
            layers.append(wrap(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False)))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, True))
        layers.append(wrap(nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)))
        self.net = nn.Sequential(*layers)
        self.add_class_embedding(num_classes, widths[-1], wrap)
        init_dcgan_weights(self)
