"""The one place that imports DeepSpeed or knows its files: process group, configs, engines.

Which ranks run it: every rank, with the same arguments (DeepSpeed's initialize is a
collective: it broadcasts rank 0's parameters).

Traps handled here (deepspeed 0.19.8; numbers are deepspeedai/DeepSpeed issues and PRs):
- each engine gets its own config dict (shared dicts mix lr/betas: #1975);
- gradient_clipping is always written explicitly: it defaults to 1.0 since 0.19.3 (#8068);
- fp16/bf16 cast only parameters since 0.19.2 (#8066), leaving BatchNorm running stats in
  fp32 and failing the forward: data_types.buffer_dtype casts the buffers too;
- fp16 at ZeRO stage 0 is refused in config validation (PR #8393);
- a client torch.optim.Adam instead of the config's "Adam", which becomes FusedAdam in
  AdamW mode and JIT-compiles an op on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

# DeepSpeed JIT-compiles its shm comm op into TORCH_EXTENSIONS_DIR. A cache shared by several
# environments rebuilds it whenever another venv's DeepSpeed sources were used last, and a
# process killed mid-build leaves a lock file that makes every later load wait forever. One
# cache per environment (set before deepspeed is imported) avoids both.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import deepspeed

# Imported now, not first inside DeepSpeedEngine.__del__: destroy() imports this module
# (deepspeedai/DeepSpeed#8213), and __del__ runs wherever the garbage collector frees an
# engine, including a daemon thread (our MLflow delivery thread, retrying against a dead
# server at the end of a run). A daemon thread stopped at interpreter exit in the middle of
# that import keeps the module's import lock, and the main thread's own __del__ of the other
# engine then waits for it forever: a run that finished hung at exit. Once imported, the
# import in __del__ is a sys.modules lookup that takes no lock.
import deepspeed.module_inject.auto_ep_comm
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from pipeline.config import Config, OptimizerConfig
from pipeline.dist import DistInfo
from pipeline.errors import UserError
from pipeline.files import load_tensors

# DeepSpeed logs every config key at INFO on every rank; keep its warnings.
os.environ.setdefault("DS_LOG_LEVEL", "warning")
# Each engine saves into a folder of its own, under this tag: DeepSpeed's default tag
# (global_step{N}) and `latest` file would collide if G and D shared one.
ENGINE_TAG = "engine"
# The plain classes DeepSpeed pickles into its ZeRO and bf16 optimizer files (0.19.8): allowed
# in the weights_only check of Engine.load, which refused every such checkpoint without them.
DEEPSPEED_FILE_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def init_distributed(info: DistInfo, timeout_minutes: float) -> None:
    """All ranks. auto_mpi_discovery off: without the env vars it would try MPI and fail on mpi4py."""
    deepspeed.init_distributed(
        dist_backend=info.backend,
        auto_mpi_discovery=False,
        verbose=False,
        timeout=timedelta(minutes=timeout_minutes),
    )
    _unlink_shm_buffer(info)


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU all-reduce creates for `rank` of this rendezvous."""
    env = os.environ
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{rank}")


def _unlink_shm_buffer(info: DistInfo) -> None:
    """All ranks. DeepSpeed's CPU shm all-reduce (ops/csrc/cpu/comm/shm.cpp, 0.19.8) creates one
    /dev/shm segment per rank and never unlinks it: every CPU run left ~64 MB per rank in RAM
    until reboot (14 GB on our CI machine). Each rank maps every segment inside
    init_distributed, so after a barrier the names can go; the mappings stay valid."""
    if info.device.type != "cpu":
        return
    torch.distributed.barrier()
    with contextlib.suppress(FileNotFoundError, KeyError):  # no segment, or no MASTER_* variables
        shm_buffer_path(info.rank).unlink()


def build_ds_config(config: Config, network: str) -> dict:
    """The DeepSpeed config of one engine ("g" or "d"), from our config or the user's raw JSON."""
    ds = config.deepspeed
    raw_path = ds.g_config_json if network == "g" else ds.d_config_json
    if raw_path:
        try:
            raw = json.loads(Path(raw_path).read_text())
        except FileNotFoundError:
            raise UserError(f"deepspeed.{network}_config_json: file not found: {raw_path}") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"deepspeed.{network}_config_json: {raw_path} is not valid JSON ({exc})") from None
        return _checked_raw(raw, config, network, raw_path)
    fp16 = {
        "enabled": ds.precision == "fp16",
        "loss_scale": 0,  # 0 = dynamic
        "initial_scale_power": ds.fp16_initial_scale_power,
        "loss_scale_window": ds.fp16_loss_scale_window,
        "hysteresis": ds.fp16_hysteresis,
        "min_loss_scale": ds.fp16_min_loss_scale,
    }
    result = {
        "train_micro_batch_size_per_gpu": config.data.batch_per_rank,
        "gradient_accumulation_steps": ds.gradient_accumulation,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        "fp16": fp16,
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.precision != "fp32":
        result["data_types"] = {"buffer_dtype": ds.precision}
    return result


def _checked_raw(raw: dict, config: Config, network: str, path: str) -> dict:
    """A user's DeepSpeed JSON: batch keys must agree with ours; clipping made explicit (#8068)."""
    expected = {
        "train_micro_batch_size_per_gpu": config.data.batch_per_rank,
        "gradient_accumulation_steps": config.deepspeed.gradient_accumulation,
    }
    for key, value in expected.items():
        if raw.setdefault(key, value) != value:
            raise UserError(f"{path}: {key} is {raw[key]} but the config says {value}; make them agree")
    raw.pop("train_batch_size", None)  # derived from the two above and the world size
    raw.setdefault("gradient_clipping", 0.0)
    fp16 = raw.get("fp16", {}).get("enabled", False)
    if fp16 and raw.get("zero_optimization", {}).get("stage", 0) == 0:
        raise UserError(f"{path}: fp16 needs zero_optimization.stage >= 1 with deepspeed 0.19.8 (PR #8393)")
    raw.setdefault("steps_per_print", 1 << 30)
    return raw


class Engine:
    """One network in its own DeepSpeed engine: how the trainer runs, updates and saves it.

    Which ranks: built on every rank with the same arguments (initialize is a collective: it
    broadcasts rank 0's parameters). backward, step, save and load run on every rank;
    save_weights on rank 0.

    Two ways forward: calling the Engine goes through DeepSpeed (its hooks reduce this
    network's gradients in backward); `module` is the raw network, for a forward whose
    backward belongs to the other engine (see Trainer.g_step)."""

    def __init__(self, name: str, model: nn.Module, config: Config, load_universal: bool = False):
        """load_universal: this engine will load a checkpoint saved on another world size
        (see load_resized)."""
        self.name = name
        self.ds_config = build_ds_config(config, name)
        if load_universal and partitions_optimizer(self.ds_config):
            # Only then: with a plain optimizer, DeepSpeed's universal load calls ZeRO-only methods.
            self.ds_config["checkpoint"] = {"load_universal": True}
        optim: OptimizerConfig = config.train.g_optim if name == "g" else config.train.d_optim
        optimizer = None
        if "optimizer" not in self.ds_config:  # a user's raw JSON may bring its own
            optimizer = torch.optim.Adam(
                model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
            )
        # The DeepSpeed engine. Pipeline code goes through the methods below; tests and
        # benchmarks may look inside.
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        if config.model.channels_last and optimizer is not None and not _flattens_parameters(self.ds_config):
            # NHWC weights: without them every convolution reorders its kernel, forward and
            # backward (5-10% of a 2-rank CPU step at MNIST size). Only after initialize, whose
            # broadcast views each parameter as bytes, which NHWC strides refuse; and only when
            # the torch optimizer updates the module's own tensors: DeepSpeed's fp16/bf16 and
            # ZeRO optimizers re-point each parameter into a flat contiguous buffer, and a
            # layout change after that would detach the module from what they update.
            # Module.to keeps each Parameter object (it sets .data), so the optimizer still
            # holds them.
            self.engine.module.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------- running
    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> torch.Tensor | float | None:
        """The optimizer step, returning the global gradient norm of the update (None between
        gradient-accumulation boundaries), as DeepSpeed holds it: a device tensor or a float.
        It is not read back here, so the step does not wait for the device.

        DeepSpeed measures the norm for fp16 and ZeRO optimizers; with a plain fp32 optimizer
        at stage 0 it does not, but the all-reduced grads sit in param.grad until step() clears
        them. With fp16 DeepSpeed itself reads the overflow flag back every step (it must decide
        whether to skip the update: FP16_Optimizer.step and ZeRO's check_overflow,
        deepspeed/runtime/fp16/loss_scaler.py): that wait is DeepSpeed's, not ours."""
        engine = self.engine
        boundary = engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and engine.zero_optimization_stage() == 0 and not engine.fp16_enabled():
            grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else None
        engine.step()
        if boundary and engine.get_global_grad_norm() is not None:
            norm = engine.get_global_grad_norm()
        return norm if boundary else None

    def compile(self) -> None:
        """torch.compile the network in place, the way DeepSpeed supports it (engine.compile, which
        calls nn.Module.compile): the engine and `module` both run the compiled forward, and the
        state dict keeps its keys. Compilation itself happens in the first steps."""
        self.engine.compile()

    @contextlib.contextmanager
    def frozen(self):
        """No gradients for this network's parameters inside the block: the other network's
        backward must not touch them (ZeRO-2 refuses a gradient computed twice: #4923)."""
        self.module.requires_grad_(False)
        try:
            yield
        finally:
            self.module.requires_grad_(True)

    # ------------------------------------------------------------------ figures
    @property
    def loss_scale(self) -> float | None:
        """The current dynamic loss scale (engine.loss_scale() returns the config value instead)."""
        if not self.engine.fp16_enabled():
            return None
        return float(getattr(self.engine.optimizer, "loss_scale", 0.0) or 0.0)

    @property
    def skipped_steps(self) -> int:
        """Updates skipped after an fp16 overflow."""
        return int(self.engine.skipped_steps)

    @property
    def learning_rate(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def set_learning_rate(self, lr: float) -> None:
        """The lr of the next updates (a host-side number: nothing waits for the device)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    # -------------------------------------------------------------------- state
    def save(self, folder: Path) -> None:
        """All ranks: weights, optimizer, loss scaler and counters into `folder` (each rank
        writes its ZeRO partition). DeepSpeed's own layout, tagged ENGINE_TAG; no `latest`
        file: the checkpointer names the checkpoint."""
        self.engine.save_checkpoint(str(folder), tag=ENGINE_TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        """All ranks: the state `save` wrote. DeepSpeed unpickles its files with
        weights_only=False, which can run code from a crafted file, so every file it will
        open for this rank is first loaded with weights_only=True: anything but tensors and
        plain values is refused before DeepSpeed touches it."""
        for file in state_files(folder, torch.distributed.get_rank()):
            self._checked_load(file)
        loaded, _ = self.engine.load_checkpoint(str(folder), tag=ENGINE_TAG)
        if loaded is None:
            raise UserError(f"checkpoint {folder.parent}: the {self.name.upper()} engine state did not load")

    def load_resized(self, folder: Path) -> None:
        """All ranks: the state `save` wrote on another world size.

        Without partitioned optimizer state (fp32 at ZeRO stage 0: every rank saved the whole
        optimizer) this is `load`. With it (ZeRO 1-2, bf16), DeepSpeed 0.19.8 refuses a new
        data-parallel size ("Automatic adjustment of ZeRO's optimizer state partitioning with a
        new world size is not currently supported", engine._load_zero_checkpoint); its own way
        is Universal Checkpointing (https://www.deepspeed.ai/tutorials/universal-checkpointing/,
        arXiv:2406.18820): rank 0 converts the folder once with deepspeed.checkpoint.ds_to_universal
        (kept beside it as universal/ for a later resume), and every rank loads its new partition
        from that, the engine built with load_universal. Two things that path leaves out are put
        back here: buffers (BatchNorm statistics: it restores parameters only) and, with fp16,
        the loss scaler (it skips the optimizer's global state)."""
        if not partitions_optimizer(self.ds_config):  # the engine was built without load_universal
            self.load(folder)
            return
        universal = Path(folder) / "universal"
        # Read once by every rank: its buffers are put back from it below.
        model_states = self._checked_load(Path(folder, ENGINE_TAG, "mp_rank_00_model_states.pt"))
        failure = None
        if torch.distributed.get_rank() == 0:
            try:
                for file in state_files(folder):  # the converter unpickles every rank's file
                    if not file.name.endswith("model_states.pt"):
                        self._checked_load(file)
                if not universal.is_dir():
                    _convert_to_universal(Path(folder), universal)
            except Exception as exc:  # every rank must hear of it, not wait for the barrier's timeout
                failure = exc
        outcome = [None if failure is None else str(failure)]
        torch.distributed.broadcast_object_list(outcome, src=0)
        if failure is not None:
            raise failure
        if outcome[0] is not None:
            raise UserError(f"rank 0 could not convert {folder} for the new world size: {outcome[0]}")
        for file in sorted(universal.rglob("*.pt")):  # DeepSpeed unpickles them unchecked
            self._checked_load(file)
        loaded, _ = self.engine.load_checkpoint(str(universal), tag=ENGINE_TAG)
        if loaded is None:
            raise UserError(f"checkpoint {folder.parent}: the {self.name.upper()} engine state did not load")
        with torch.no_grad():
            for name, buffer in self.module.named_buffers():
                buffer.copy_(model_states["module"][name])
        if self.engine.fp16_enabled():
            first = next(Path(folder, ENGINE_TAG).glob("*zero_pp_rank_0_*.pt"))
            # The loss scaler and overflow state, as DeepSpeed's own non-universal load restores them.
            self.engine.optimizer._load_global_state(self._checked_load(first)["optimizer_state_dict"])

    def _checked_load(self, file: Path):
        """A file DeepSpeed writes, loaded with weights_only=True and DeepSpeed's own plain classes
        allowed (DEEPSPEED_FILE_CLASSES): anything else in it is refused with a UserError."""
        with torch.serialization.safe_globals(DEEPSPEED_FILE_CLASSES):
            return load_tensors(file, f"{self.name.upper()} engine file")

    def save_weights(self, path: Path) -> None:
        """Rank 0: this network's state dict, floating tensors in fp32 (fp16/bf16 ones are cast
        up), readable with torch alone. At ZeRO stages 0-2 every rank holds the full parameters."""
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, path)


def state_files(folder: Path, rank: int | None = None) -> list[Path]:
    """The files of `folder` that DeepSpeed's load_checkpoint unpickles on `rank`: the model
    states (mp_rank_00_model_states.pt) and, with ZeRO or bf16, this rank's optimizer partition
    ([bf16_]zero_pp_rank_{rank}_mp_rank_00_optim_states.pt); every rank's with rank None."""
    tag = Path(folder) / ENGINE_TAG
    partitions = "*zero_pp_rank_*.pt" if rank is None else f"*zero_pp_rank_{rank}_*.pt"
    return sorted([*tag.glob("*model_states.pt"), *tag.glob(partitions)])


def partitions_optimizer(ds_config: dict) -> bool:
    """Whether each rank saves its own part of the optimizer state: with ZeRO stage 1 or 2. (At
    stage 0 with bf16 and our client Adam, DeepSpeed wraps it in FP16_UnfusedOptimizer, which
    saves the whole state with the model, as fp32 at stage 0 does.)"""
    return ds_config.get("zero_optimization", {}).get("stage", 0) > 0


def _flattens_parameters(ds_config: dict) -> bool:
    """Whether DeepSpeed's optimizer keeps its own flat or partitioned copies of the parameters
    (fp16, bf16, ZeRO) rather than updating the module's tensors with the torch optimizer."""
    half = any(ds_config.get(key, {}).get("enabled", False) for key in ("fp16", "bf16"))
    return half or partitions_optimizer(ds_config)


def _convert_to_universal(folder: Path, universal: Path) -> None:
    """Rank 0: DeepSpeed's converter from an engine folder to a universal checkpoint, written
    to a temporary folder and renamed, so a kill midway leaves nothing half-made."""
    from deepspeed.checkpoint import ds_to_universal

    partial = universal.with_name(f"{universal.name}.tmp")
    shutil.rmtree(partial, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(folder / ENGINE_TAG),
        output_folder=str(partial / ENGINE_TAG),
        num_extract_workers=1,  # in-process: a rank must not fork a process pool
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our engines are not Megatron models: no TP/PP layout info
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
        ds_to_universal.main(args)
    os.replace(partial, universal)


def compute_dtype(config: Config) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.deepspeed.precision]
