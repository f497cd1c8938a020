"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training",
arXiv:2006.10738): the same random, differentiable transforms applied to every image D sees,
real and generated, in D's step, G's step and the gradient penalties, so D cannot overfit a
small dataset while G still learns the un-augmented distribution.

The transforms follow the authors' DiffAugment_pytorch.py (mit-han-lab/data-efficient-gans):
`color` (brightness, saturation, contrast), `translation` (up to 1/8 of the side, zero
padded) and `cutout` (a square of half the side). Each image draws its own parameters from
the generator it is given: the rank's step generator, so a resumed run draws the same ones.
Images are N x C x H x W in [-1, 1], on any device and dtype.

Which ranks run it: every rank, on its own images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def _uniform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One U[0, 1) draw per image, shaped to broadcast over C x H x W, in x's dtype."""
    return torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device).to(x.dtype)


def _color(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    x = x + (_uniform(x, generator) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(x, generator) * 2) + mean  # saturation (nothing to do on 1 channel)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, generator) + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    n, _, h, w = x.shape
    shift_h, shift_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-shift_h, shift_h + 1, (n, 1, 1), generator=generator, device=x.device)
    dx = torch.randint(-shift_w, shift_w + 1, (n, 1, 1), generator=generator, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    # Index into a copy padded by one zero pixel: a pixel shifted in from outside is 0.
    rows = (rows + dy + 1).clamp(0, h + 1).expand(n, h, w)
    cols = (cols + dx + 1).clamp(0, w + 1).expand(n, h, w)
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # N x H+2 x W+2 x C
    batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    return padded[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def _cutout(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - size_h % 2), (n, 1, 1), generator=generator, device=x.device)
    left = torch.randint(0, w + (1 - size_w % 2), (n, 1, 1), generator=generator, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    # The square of the authors' code: rows top - size_h // 2 .. + size_h - 1, clamped to the image.
    inside_rows = (rows >= top - size_h // 2) & (rows < top - size_h // 2 + size_h)
    inside_cols = (cols >= left - size_w // 2) & (cols < left - size_w // 2 + size_w)
    return x * (~(inside_rows & inside_cols)).unsqueeze(1).to(x.dtype)


_TRANSFORMS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...] | list[str], generator: torch.Generator) -> torch.Tensor:
    """x with the policy's transforms applied, in the authors' order (color, translation,
    cutout, whichever are named); x itself when the policy is empty."""
    for name in POLICIES:
        if name in policy:
            x = _TRANSFORMS[name](x, generator)
    return x
