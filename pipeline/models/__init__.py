"""The networks, chosen by model.arch: `dcgan` (the default) or `mlp` (the baseline)."""

from __future__ import annotations

from torch import nn

from pipeline.models import dcgan, mlp


def build_generator(
    arch: str, resolution: int, channels: int, latent_dim: int, width: int, num_classes: int = 0
) -> nn.Module:
    """Also what a generator export rebuilds from its recorded model fields."""
    module = {"dcgan": dcgan, "mlp": mlp}[arch]
    return module.Generator(resolution, channels, latent_dim, width, num_classes)


def build_pair(model) -> tuple[nn.Module, nn.Module]:
    """(G, D) for a ModelConfig whose classes are settled (config.with_classes)."""
    classes = model.num_classes or 0
    generator = build_generator(model.arch, model.resolution, model.channels, model.latent_dim, model.g_width, classes)
    if model.arch == "mlp":
        return generator, mlp.Discriminator(model.resolution, model.channels, model.d_width, classes)
    return generator, dcgan.Discriminator(model.resolution, model.channels, model.d_width, model.d_norm, classes)
