"""The benchmarks' shared set-up: shards of real MNIST, a single-rank process group, configs
and Trainers from overrides, the interleaved round timer, the plain PyTorch baseline loop,
CPU-time readers, and the closing JSON line (name, figures, baseline, ratio, machine).

Every benchmark imports it as `from harness import ...` (bench/ is put on sys.path first)."""

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/X.py` from anywhere
    sys.path.insert(0, str(REPO))


def mnist_shards(
    folder: Path, resolution: int = 32, channels: int = 1, limit: int = 512, image_format: str = "raw", **options
) -> Path:
    """Shards of the first `limit` real MNIST training digits (the built-in source: no
    download), at this resolution and channel count. options: prepare's (samples_per_shard...)."""
    from pipeline.data.prepare import Transform, prepare

    options.setdefault("progress", False)
    prepare("mnist", folder, Transform(resolution, channels, image_format=image_format), limit=limit, **options)
    return Path(folder)


def single_rank(device: str | None = None):
    """This process as a 1-rank job, its process group up (DeepSpeed needs one)."""
    from pipeline import engines
    from pipeline.dist import detect

    info = detect(device)
    engines.init_distributed(info, 5)
    return info


def bench_config(shards: Path, run_root: Path, *overrides: str, config_file: str | None = None):
    """A config for an in-process benchmark: these shards and run root, no progress bar, the
    loader in the process (data.workers=0) unless an override says otherwise."""
    from pipeline.config import load_config

    base = [f"data.shards={shards}", f"train.run_root={run_root}", "train.progress=false", "data.workers=0"]
    return load_config(config_file, [*base, *overrides])


def bench_trainer(config, info, run_dir: Path):
    """A Trainer without reporters: it writes nothing but the checkpoints it is asked for."""
    from pipeline.train import Trainer

    return Trainer(config, info, run_dir)


def interleaved_rounds(
    candidates: dict[str, Callable[[], float]], rounds: int, unit: str = "", warm_up: bool = True
) -> dict[str, list]:
    """Each candidate's figure once per round, in turn (A B C, A B C, ...), after one warm-up
    round unless the caller warmed up, so every candidate sees the same machine state; one
    progress line per round with the ETA."""
    for measure in candidates.values() if warm_up else ():
        measure()
    figures: dict[str, list] = {name: [] for name in candidates}
    started = time.perf_counter()
    for r in range(rounds):
        for name, measure in candidates.items():
            figures[name].append(measure())
        elapsed = time.perf_counter() - started
        line = ", ".join(f"{name} {values[-1]:.4g}{unit}" for name, values in figures.items())
        print(f"round {r + 1}/{rounds}: {line}; ETA {elapsed / (r + 1) * (rounds - r - 1):.0f} s", flush=True)
    return figures


class PlainLoop:
    """The baseline every speed and quality figure is held to: the DCGAN step written the plain
    way (pytorch/examples' dcgan/main.py): torch.optim.Adam, no DeepSpeed, no EMA, the same
    models, algorithm (D on real + detached fake, then G through a frozen D) and losses.
    precision bf16/fp16: torch.autocast, and for fp16 a GradScaler (torch's AMP recipe)."""

    def __init__(self, config, device, precision: str = "fp32"):
        from pipeline.models import build_pair

        torch.manual_seed(config.seed)
        generator, discriminator = build_pair(config.model)
        self.g, self.d = generator.to(device), discriminator.to(device)
        o = config.train
        self.g_opt = torch.optim.Adam(self.g.parameters(), lr=o.g_optim.lr, betas=o.g_optim.betas)
        self.d_opt = torch.optim.Adam(self.d.parameters(), lr=o.d_optim.lr, betas=o.d_optim.betas)
        self.latent_dim, self.device = config.model.latent_dim, device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def step(self, real):
        z = torch.randn(real.shape[0], self.latent_dim, device=self.device)
        with self.autocast():
            with torch.no_grad():
                fake = self.g(z)
            d_loss = F.softplus(-self.d(real)).mean() + F.softplus(self.d(fake)).mean()
        self.d_opt.zero_grad(set_to_none=True)
        self.scaler.scale(d_loss).backward()
        self.scaler.step(self.d_opt)
        self.d.requires_grad_(False)
        with self.autocast():
            g_loss = F.softplus(-self.d(self.g(torch.randn_like(z)))).mean()
        self.g_opt.zero_grad(set_to_none=True)
        self.scaler.scale(g_loss).backward()
        self.scaler.step(self.g_opt)
        self.scaler.update()
        self.d.requires_grad_(True)
        return d_loss.detach(), g_loss.detach()  # not read back: a good plain loop does not wait every step


def machine() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def report(name: str, figures: dict, baseline: dict, ratio: float, **extra) -> None:
    """Every benchmark ends with exactly this one JSON line."""
    print(
        json.dumps(
            {
                "benchmark": name,
                "figures": figures,
                "baseline": baseline,
                "ratio": round(ratio, 3),
                "machine": machine(),
                **extra,
            }
        )
    )


def stat_cpu_s(stat: str) -> tuple[float, int]:
    """(CPU seconds, user + system; parent pid) from a Linux /proc/.../stat file: fields 14, 15, 4."""
    fields = Path(stat).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[1])


def thread_cpu_s(exclude: frozenset[int] = frozenset()) -> tuple[float, set[int]]:
    """CPU seconds of this process's threads but `exclude`, and the set of threads read."""
    total, read = 0.0, set()
    for tid in {int(t) for t in os.listdir("/proc/self/task")} - exclude:
        try:
            total += stat_cpu_s(f"/proc/self/task/{tid}/stat")[0]
        except FileNotFoundError:  # the thread ended
            continue
        read.add(tid)
    return total, read


def children_cpu_s() -> float:
    """CPU seconds of this process's live child processes (say, DataLoader workers). A figure
    that a busy machine moves far less than it moves wall-clock rates."""
    total, me = 0.0, os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            seconds, parent = stat_cpu_s(f"/proc/{pid}/stat")
        except (FileNotFoundError, ProcessLookupError):  # the process ended
            continue
        total += seconds if parent == me else 0.0
    return total
