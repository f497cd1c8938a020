"""The plain MLP GAN this project started from: the baseline the DCGAN recipe must beat.

As in the article's Keras MNIST example: G and D each have two Dense-256 ReLU hidden
layers; both train with Adam(1e-4), batch 128. Two changes for this pipeline:
- G ends in tanh, not sigmoid: our images live in [-1, 1] (tanh(x) = 2 sigmoid(2x) - 1,
  the same function family rescaled), and G returns N x C x H x W like the DCGAN;
- D ends in a linear unit: it returns the logit, and the losses apply the sigmoid stably.
The hidden width is model.g_width / model.d_width (256 in configs/mnist32_mlp.yaml).
"""

from __future__ import annotations

import torch
from torch import nn


class Generator(nn.Module):
    def __init__(self, resolution: int = 32, channels: int = 1, latent_dim: int = 100, width: int = 256):
        super().__init__()
        self.latent_dim, self.shape = latent_dim, (channels, resolution, resolution)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, width),
            nn.ReLU(True),
            nn.Linear(width, width),
            nn.ReLU(True),
            nn.Linear(width, channels * resolution * resolution),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim)).view(z.shape[0], *self.shape)


class Discriminator(nn.Module):
    def __init__(self, resolution: int = 32, channels: int = 1, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * resolution * resolution, width),
            nn.ReLU(True),
            nn.Linear(width, width),
            nn.ReLU(True),
            nn.Linear(width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()
