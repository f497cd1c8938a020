"""The generator export: a plain fp32 state dict plus its model config.

Loadable with torch alone (`torch.load(path, weights_only=True)`), without DeepSpeed or the
world size of the run that made it. Used by `pipeline sample` (and later `eval`, `export`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models.dcgan import Generator

FORMAT = "gan-pipeline-generator/1"


def save_generator(path: str | Path, generator: nn.Module, model_config, step: int, ema: bool) -> Path:
    state = {k: v.detach().float().cpu() for k, v in generator.state_dict().items()}
    model = {"resolution": model_config.resolution, "channels": model_config.channels,
             "latent_dim": model_config.latent_dim, "width": model_config.g_width}  # fmt: skip
    torch.save({"format": FORMAT, "ema": ema, "step": step, "model": model, "state_dict": state}, path)
    return Path(path)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict]:
    """weights_only=True: loading never runs code from the file."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable generator export ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a gan-pipeline generator export")
    generator = Generator(**payload["model"]).to(device)
    generator.load_state_dict(payload["state_dict"])
    return generator.eval(), payload
