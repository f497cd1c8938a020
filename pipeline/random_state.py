"""Every random stream of one rank, as a state dict of tensors and plain values (so a
checkpoint loads with weights_only=True), and back.

Which ranks run it: every rank, for its own streams."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(step_generator: torch.Generator) -> dict:
    """python, numpy and torch's global streams (and CUDA's), plus the trainer's step generator."""
    np_kind, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": np_pos,
            "has_gauss": np_gauss,
            "cached_gaussian": np_cached,
        },
        "torch": torch.get_rng_state(),
        "step_generator": step_generator.get_state(),
        "step_generator_device": step_generator.device.type,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


# A CPU generator's state is its Mersenne Twister (5056 bytes); a CUDA one's is Philox's seed
# and offset (16 bytes). Checkpoints from before step_generator_device are told apart by size.
CPU_GENERATOR_STATE_BYTES = 5056


def saved_device_type(state: dict) -> str:
    """The device type of the step generator whose state `state` holds: "cpu" or "cuda"."""
    if "step_generator_device" in state:
        return state["step_generator_device"]
    return "cpu" if state["step_generator"].numel() == CPU_GENERATOR_STATE_BYTES else "cuda"


def set_rng_state(state: dict, step_generator: torch.Generator) -> None:
    """Every stream as it was saved. The step generator must be of the saved device type
    (saved_device_type): a state of another type does not fit it."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    step_generator.set_state(state["step_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def derive_rng_state(seed: int, step: int, rank: int, step_generator: torch.Generator) -> None:
    """Every stream of this rank seeded from (seed, step, rank): for a resume on another world
    size, where the saved streams belonged to ranks that may no longer exist."""
    python_seed, numpy_seed, torch_seed, step_seed = np.random.SeedSequence([seed, step, rank]).generate_state(4)
    random.seed(int(python_seed))
    np.random.seed(int(numpy_seed))
    torch.manual_seed(int(torch_seed))  # also seeds CUDA's streams
    step_generator.manual_seed(int(step_seed))
