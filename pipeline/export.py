"""The generator export: a plain fp32 state dict plus its model config.

Loadable with torch alone (`torch.load(path, weights_only=True)`), without DeepSpeed or the
world size of the run that made it. Used by `pipeline sample`, `eval` and `export`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from pipeline.checkpoint import generator_state, latest_checkpoint
from pipeline.errors import UserError
from pipeline.files import load_tensors, require_fields
from pipeline.models import build_generator
from pipeline.models.conditioning import class_labels

FORMAT = "gan-pipeline-generator/1"


@torch.no_grad()
def generate(generator: nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Images from latents (and, for a class-conditional generator, their classes) with
    BatchNorm on batch statistics, as the reference DCGAN samples.

    The EMA's averaged weights do not match the live G's running statistics, and eval-mode
    BatchNorm with mismatched statistics washes samples out. Runs on a copy, so neither the
    caller's mode nor its running statistics change."""
    sampler = copy.deepcopy(generator).train()
    parameter = next(sampler.parameters())
    labels = labels.to(parameter.device) if labels is not None else None
    return sampler(z.to(device=parameter.device, dtype=parameter.dtype), labels)


PAYLOAD_FIELDS = {"step": int, "ema": bool, "model": dict, "state_dict": dict}
MODEL_FIELDS = {"resolution": int, "channels": int, "latent_dim": int, "width": int}


def generator_payload(state_dict: dict, model: dict, step: int, ema: bool) -> dict:
    """The export file's contents. `model` holds the config's resolution, channels,
    latent_dim and g_width, and num_classes for a class-conditional generator (0 or absent:
    unconditional; exports made before conditioning have no such field)."""
    return {
        "format": FORMAT,
        "ema": ema,
        "step": step,
        "model": {
            "arch": model.get("arch", "dcgan"),
            "resolution": model["resolution"],
            "channels": model["channels"],
            "latent_dim": model["latent_dim"],
            "width": model["g_width"],
            "num_classes": model.get("num_classes") or 0,
        },
        "state_dict": {k: v.detach().float().cpu() for k, v in state_dict.items()},
    }


def save_generator(path: str | Path, generator: nn.Module, model_config, step: int, ema: bool) -> Path:
    torch.save(generator_payload(generator.state_dict(), model_config.model_dump(), step, ema), path)
    return Path(path)


def resolve_source(path: str | Path) -> Path:
    """A generator export file, a checkpoint folder, or a run folder (its newest checkpoint)."""
    return latest_checkpoint(path) or Path(path)


def load_generator(
    path: str | Path, device: str | torch.device = "cpu", prefer_ema: bool = True
) -> tuple[torch.nn.Module, dict]:
    """From an export, a checkpoint folder or a run folder, without DeepSpeed or the run's world size.
    weights_only=True everywhere: loading never runs code from the file. From a checkpoint,
    prefer_ema=False reads the trained G itself instead of its EMA."""
    path = resolve_source(path)
    if path.is_dir():
        state, ema, meta = generator_state(path, prefer_ema)
        payload = generator_payload(state, meta["config"]["model"], meta["step"], ema)
    else:
        payload = load_tensors(path, "checkpoint")  # named after the --checkpoint option
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a gan-pipeline generator export")
    require_fields(payload, PAYLOAD_FIELDS, f"generator {path}")
    require_fields(payload["model"], MODEL_FIELDS, f"generator {path}, its model")
    if not isinstance(payload.get("class", 0), int):
        raise UserError(f"generator {path}: its class {payload['class']!r} is not a class number")
    try:
        return generator_from_payload(payload, device), payload
    except (RuntimeError, TypeError, ValueError) as exc:  # weights that do not fit the model it names
        reason = str(exc).replace("\n", " ").replace("\t", "")[:300]
        raise UserError(f"generator {path}: its weights do not fit its model ({reason})") from None


def generator_from_payload(payload: dict, device: str | torch.device = "cpu") -> nn.Module:
    generator = build_generator(**{"arch": "dcgan"} | payload["model"]).to(device)  # exports before arch: dcgan
    generator.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    return generator.eval()


@torch.no_grad()
def inference_generator(payload: dict, batches: int = 8, batch_size: int = 128, seed: int = 0) -> nn.Module:
    """A generator that samples well one latent at a time, in eval mode: what a user of the
    MLflow model calls. `generate` samples with batch statistics, which needs a batch; here
    each BatchNorm's running statistics are recomputed for these (EMA) weights as the exact
    average over `batches` batches of random latents (momentum None), the BatchNorm
    recalibration of SWA (Izmailov et al. 2018; torch.optim.swa_utils.update_bn)."""
    generator = generator_from_payload(payload)
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: every batch counts the same
        generator.train()
        latents = torch.Generator().manual_seed(seed)
        for _ in range(batches):  # class-balanced batches: a conditional BatchNorm's statistics are of all classes
            z = torch.randn(batch_size, payload["model"]["latent_dim"], generator=latents)
            generator(z, class_labels(generator.num_classes, batch_size))
    generator.eval()
    return ClassInColumn(generator, payload.get("class")) if generator.num_classes else generator


class ClassInColumn(nn.Module):
    """A class-conditional generator behind one float32 input, as MLflow's PyTorch flavour feeds
    one array to a model: row i holds latent i then, in the last column, the class to draw
    (the signature's input is latent_dim + 1 wide: tracking/model_registry.py). An export made with
    `export --class K` takes latents alone and draws class K."""

    def __init__(self, generator: nn.Module, fixed_class: int | None = None):
        super().__init__()
        self.generator, self.fixed_class = generator, fixed_class
        self.latent_dim, self.num_classes = generator.latent_dim, generator.num_classes

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.fixed_class is not None:
            labels = torch.full((inputs.shape[0],), self.fixed_class, dtype=torch.long, device=inputs.device)
            return self.generator(inputs, labels)
        labels = inputs[:, -1].round().long()  # outside 0..C-1: the embedding lookup raises
        return self.generator(inputs[:, :-1], labels)


def export_generator(source: str | Path, out: str | Path, chosen_class: int | None = None) -> dict:
    """`pipeline export`: a checkpoint (or run folder) -> a plain generator file. chosen_class:
    of a class-conditional generator, an export that makes that class unless told otherwise
    (`sample` without --class; the MLflow model of it takes latents alone)."""
    generator, payload = load_generator(source)
    if chosen_class is not None:
        try:
            class_labels(generator.num_classes, 1, chosen_class)
        except ValueError as exc:
            raise UserError(f"--class {chosen_class}: {exc}") from None
        payload["class"] = chosen_class
    torch.save(payload, out)
    return payload


def sample_labels(generator: nn.Module, payload: dict, n: int, chosen_class: int | None) -> torch.Tensor | None:
    """The classes `sample` draws n images of: --class, else the export's own class, else the
    classes in turn; None for an unconditional generator. A bad --class is a user's error."""
    chosen = chosen_class if chosen_class is not None else payload.get("class")
    try:
        return class_labels(generator.num_classes, n, chosen)
    except ValueError as exc:
        raise UserError(f"--class {chosen}: {exc}") from None
