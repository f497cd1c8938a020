"""The generator export: a plain fp32 state dict plus its model config.

Loadable with torch alone (`torch.load(path, weights_only=True)`), without DeepSpeed or the
world size of the run that made it. Used by `pipeline sample` (and later `eval`, `export`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models.dcgan import Generator

FORMAT = "gan-pipeline-generator/1"


@torch.no_grad()
def generate(generator: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Images from latents with BatchNorm on batch statistics, as the reference DCGAN samples.

    The EMA's averaged weights do not match the live G's running statistics, and eval-mode
    BatchNorm with mismatched statistics washes samples out. Runs on a copy, so neither the
    caller's mode nor its running statistics change."""
    sampler = copy.deepcopy(generator).train()
    return sampler(z.to(device=next(sampler.parameters()).device, dtype=next(sampler.parameters()).dtype))


def save_generator(path: str | Path, generator: nn.Module, model_config, step: int, ema: bool) -> Path:
    state = {k: v.detach().float().cpu() for k, v in generator.state_dict().items()}
    model = {"resolution": model_config.resolution, "channels": model_config.channels,
             "latent_dim": model_config.latent_dim, "width": model_config.g_width}  # fmt: skip
    torch.save({"format": FORMAT, "ema": ema, "step": step, "model": model, "state_dict": state}, path)
    return Path(path)


def _from_checkpoint(folder: Path) -> dict:
    """An export payload from a checkpoint folder: the EMA generator, or G's engine weights."""
    meta = json.loads((folder / "meta.json").read_text())
    model = meta["config"]["model"]
    if (folder / "ema.pt").is_file():
        state, ema = torch.load(folder / "ema.pt", map_location="cpu", weights_only=True)["model"], True
    else:
        engine_state = torch.load(folder / "g" / "engine" / "mp_rank_00_model_states.pt", map_location="cpu",
                                  weights_only=True)  # fmt: skip
        state, ema = engine_state["module"], False
    return {
        "format": FORMAT, "ema": ema, "step": meta["step"], "state_dict": state,
        "model": {"resolution": model["resolution"], "channels": model["channels"],
                  "latent_dim": model["latent_dim"], "width": model["g_width"]},
    }  # fmt: skip


def resolve_source(path: str | Path) -> Path:
    """A generator export file, a checkpoint folder, or a run folder (its newest checkpoint)."""
    from pipeline.checkpoint import latest_checkpoint  # tensors and json only: no DeepSpeed import

    return latest_checkpoint(path) or Path(path)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict]:
    """From an export, a checkpoint folder or a run folder, without DeepSpeed or the run's world size.
    weights_only=True everywhere: loading never runs code from the file."""
    path = resolve_source(path)
    try:
        if path.is_dir():
            payload = _from_checkpoint(path)
        else:
            payload = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise UserError(f"checkpoint not found: {exc.filename or path}") from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable generator export ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a gan-pipeline generator export")
    generator = Generator(**payload["model"]).to(device)
    generator.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    return generator.eval(), payload


def export_generator(source: str | Path, out: str | Path) -> dict:
    """`pipeline export`: a checkpoint (or run folder) -> a plain generator file."""
    generator, payload = load_generator(source)
    model = payload["model"]
    torch.save({"format": FORMAT, "ema": payload["ema"], "step": payload["step"], "model": model,
                "state_dict": {k: v.detach().float().cpu() for k, v in generator.state_dict().items()}}, out)  # fmt: skip
    return payload
