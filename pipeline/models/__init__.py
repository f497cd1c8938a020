"""The networks, chosen by model.arch: `dcgan` (the default) or `mlp` (the baseline)."""

from __future__ import annotations

from torch import nn

from pipeline.models import dcgan, mlp


def build_generator(arch: str, resolution: int, channels: int, latent_dim: int, width: int) -> nn.Module:
    """Also what a generator export rebuilds from its recorded model fields."""
    module = {"dcgan": dcgan, "mlp": mlp}[arch]
    return module.Generator(resolution, channels, latent_dim, width)


def build_pair(model) -> tuple[nn.Module, nn.Module]:
    """(G, D) for a ModelConfig."""
    generator = build_generator(model.arch, model.resolution, model.channels, model.latent_dim, model.g_width)
    if model.arch == "mlp":
        return generator, mlp.Discriminator(model.resolution, model.channels, model.d_width)
    return generator, dcgan.Discriminator(model.resolution, model.channels, model.d_width, model.d_norm)
