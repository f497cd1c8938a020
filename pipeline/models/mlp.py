"""The plain MLP GAN this project started from: the baseline the DCGAN recipe must beat.

As in the article's Keras MNIST example: G and D each have two Dense-256 ReLU hidden
layers; both train with Adam(1e-4), batch 128. Two changes for this pipeline:
- G ends in tanh, not sigmoid: our images live in [-1, 1] (tanh(x) = 2 sigmoid(2x) - 1,
  the same function family rescaled), and G returns N x C x H x W like the DCGAN;
- D ends in a linear unit: it returns the logit, and the losses apply the sigmoid stably.
The hidden width is model.g_width / model.d_width (256 in configs/mnist32_mlp.yaml).
With num_classes (model.conditional), G normalises each hidden layer with a class-conditional
BatchNorm before its ReLU and D has a projection head on its last hidden layer
(pipeline/models/conditioning.py); unconditional, both are exactly the article's networks.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.conditioning import ClassBatchNorm, Conditioned, ProjectionDiscriminator, check_labels


class Generator(nn.Module):
    def __init__(
        self, resolution: int = 32, channels: int = 1, latent_dim: int = 100, width: int = 256, num_classes: int = 0
    ):
        super().__init__()
        self.latent_dim, self.num_classes, self.shape = latent_dim, num_classes, (channels, resolution, resolution)

        def hidden(n_in: int) -> list[nn.Module]:
            norm = [ClassBatchNorm(width, num_classes, dims=1)] if num_classes else []
            return [nn.Linear(n_in, width), *norm, nn.ReLU(True)]

        self.net = Conditioned(
            *hidden(latent_dim), *hidden(width), nn.Linear(width, channels * resolution * resolution), nn.Tanh()
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_labels(self.num_classes, labels)
        return self.net(z.view(z.shape[0], self.latent_dim), labels).view(z.shape[0], *self.shape)


class Discriminator(ProjectionDiscriminator):
    def __init__(self, resolution: int = 32, channels: int = 1, width: int = 256, num_classes: int = 0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * resolution * resolution, width),
            nn.ReLU(True),
            nn.Linear(width, width),
            nn.ReLU(True),
            nn.Linear(width, 1),
        )
        self.add_class_embedding(num_classes, width)
