"""Counting the places where the host would wait for a GPU, on any device, CPU included.

A CUDA device runs the ops the host queued while the host queues more; the host waits only
when it needs a value back (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, a data-dependent
shape such as `nonzero`) or when something synchronizes the device. A training step that
does neither keeps the GPU busy; each wait drains its queue. This module counts those waits
where they would happen, so a CPU-only machine can show what a GPU run would pay:

- ops that read a value back, as the dispatcher sees them (a TorchDispatchMode: the same on
  CPU as on CUDA): `_local_scalar_dense` behind `.item()`/`float()`/`bool()`, `nonzero`,
  `is_nonzero`, `equal`, `masked_select`, `unique`...; on CUDA also any copy to the host;
- `tolist()`, `numpy()` and `cpu()` on a tensor, wrapped at the Python level (on CPU the
  dispatcher does not see them);
- `synchronize()` on DeepSpeed's accelerator (its timers call it), on `torch.cuda`, and on
  CUDA streams and events.

Some reads are of tensors that stay on the host in a GPU run too, so they cost no wait:
those are listed apart (`host_resident`), each with the reason (HOST_RESIDENT).

Which ranks: any; each process counts its own waits. Used by the tests and by
bench/gpu_train_check.py, never during training.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must have: the dispatcher's names (overload packets).
READ_BACK_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
        "is_nonzero",
        "equal",
        "nonzero",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "repeat_interleave",
    }
)
HOST_CALLS = ("tolist", "numpy", "cpu")
# Reads that cost no wait in a GPU run, by the file that makes them: (path fragment, why).
HOST_RESIDENT = (
    (
        "torch/optim/",
        "torch.optim keeps Adam's step count on the host unless capturable or fused (torch/optim/adam.py)",
    ),
    ("pipeline/data/", "the loader's batches are host (pinned) memory until the step copies them to the device"),
)
_THIS_FILE = Path(__file__).as_posix()
_TORCH_DIR = Path(torch.__file__).parent.as_posix() + "/"


@dataclass
class DeviceWaits:
    """What one counting block saw: each wait as (kind, call site), where the call site is the
    innermost frame outside torch itself (DeepSpeed's or ours)."""

    waits: list[tuple[str, str]] = field(default_factory=list)
    host_resident: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, site, why)

    def count(self, site_contains: str = "") -> int:
        return sum(site_contains in site for _, site in self.waits)

    def sites(self) -> collections.Counter:
        """How many waits each (kind, site) made: what a failing test prints."""
        return collections.Counter(self.waits)

    def report(self) -> str:
        lines = [f"{n:5d} x {kind:<10} {site}" for (kind, site), n in self.sites().most_common()]
        return "\n".join(lines) or "(none)"


def _call_site(stack: traceback.StackSummary) -> tuple[str, str | None]:
    """(the innermost frame outside torch and this module, why it is host-resident or None)."""
    why = None
    for frame in reversed(stack):
        path = Path(frame.filename).as_posix()
        for fragment, reason in HOST_RESIDENT:
            if why is None and fragment in path:
                why = reason
        if path == _THIS_FILE or path.startswith(_TORCH_DIR):
            continue
        parts = Path(path).parts
        short = "/".join(parts[-3:]) if "site-packages" in parts else "/".join(parts[-2:])
        return f"{short}:{frame.lineno} ({frame.name})", why
    return "torch", why


class _Counter(TorchDispatchMode):
    def __init__(self, result: DeviceWaits):
        super().__init__()
        self.result = result
        self.inside_host_call = threading.local()

    def record(self, kind: str) -> None:
        if getattr(self.inside_host_call, "depth", 0):
            return  # the wrapped tolist/numpy/cpu already counted this wait
        site, why = _call_site(traceback.extract_stack())
        if why is None:
            self.result.waits.append((kind, site))
        else:
            self.result.host_resident.append((kind, site, why))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in READ_BACK_OPS:
            self.record(name)
        elif name in ("_to_copy", "copy_") and _device_to_host(func, args, kwargs or {}):
            self.record("to_host")
        return func(*args, **(kwargs or {}))


def _device_to_host(func, args, kwargs) -> bool:
    """A copy from a CUDA tensor into host memory (never true on a CPU-only machine)."""
    if func._overloadpacket.__name__ == "copy_":
        destination, source = args[0], args[1]
        return source.device.type == "cuda" and destination.device.type == "cpu"
    target = kwargs.get("device")
    return args[0].device.type == "cuda" and target is not None and torch.device(target).type == "cpu"


@contextlib.contextmanager
def _patched(owner, name: str, wrapper: Callable):
    original = getattr(owner, name)
    setattr(owner, name, wrapper(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def count_device_waits(accelerator=None):
    """Count every device wait made inside the block, on this thread (and in the autograd
    engine's work for it). accelerator: DeepSpeed's accelerator object, whose synchronize()
    its timers call (engines.accelerator()); None counts torch's alone."""
    result = DeviceWaits()
    counter = _Counter(result)

    def host_call(kind: str):
        def wrap(original):
            def wrapped(tensor, *args, **kwargs):
                counter.record(kind)
                depth = getattr(counter.inside_host_call, "depth", 0)
                counter.inside_host_call.depth = depth + 1
                try:
                    return original(tensor, *args, **kwargs)
                finally:
                    counter.inside_host_call.depth = depth

            return wrapped

        return wrap

    def synchronizing(kind: str):
        def wrap(original):
            def wrapped(*args, **kwargs):
                counter.record(kind)
                return original(*args, **kwargs)

            return wrapped

        return wrap

    with contextlib.ExitStack() as stack:
        for name in HOST_CALLS:
            stack.enter_context(_patched(torch.Tensor, name, host_call(name)))
        stack.enter_context(_patched(torch.cuda, "synchronize", synchronizing("synchronize")))
        stack.enter_context(_patched(torch.cuda.Stream, "synchronize", synchronizing("synchronize")))
        stack.enter_context(_patched(torch.cuda.Event, "synchronize", synchronizing("synchronize")))
        if accelerator is not None:
            stack.enter_context(_patched(accelerator, "synchronize", synchronizing("synchronize")))
        stack.enter_context(counter)
        yield result
