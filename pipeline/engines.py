"""The one place that imports DeepSpeed or knows its files: process group, configs, engines.

Which ranks run it: every rank, with the same arguments (DeepSpeed's initialize is a
collective: it broadcasts rank 0's parameters).

Traps handled here (deepspeed 0.19.8; numbers are deepspeedai/DeepSpeed issues and PRs):
- each engine gets its own config dict (shared dicts mix lr/betas: #1975);
- gradient_clipping is always written explicitly: it defaults to 1.0 since 0.19.3 (#8068);
- fp16/bf16 cast only parameters since 0.19.2 (#8066), leaving BatchNorm running stats in
  fp32 and failing the forward: data_types.buffer_dtype casts the buffers too;
- fp16 at ZeRO stage 0 is refused in config validation (PR #8393), and so is bf16 there
  (FP16_UnfusedOptimizer reads each gradient back every step);
- nothing in a step waits for the device: the throughput timer (on by default) is off, bf16
  runs without check_grad_overflow, fp32 ZeRO without the norm nobody uses
  (tests/test_device_waits.py counts the waits);
- a client torch.optim.Adam instead of the config's "Adam", which becomes FusedAdam in
  AdamW mode and JIT-compiles an op on CPU.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import json
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import deepspeed

# Imported now, not first inside DeepSpeedEngine.__del__: destroy() imports this module
# (deepspeedai/DeepSpeed#8213), and __del__ runs wherever the garbage collector frees an
# engine, including a daemon thread (our MLflow delivery thread, retrying against a dead
# server at the end of a run). A daemon thread stopped at interpreter exit in the middle of
# that import keeps the module's import lock, and the main thread's own __del__ of the other
# engine then waits for it forever: a run that finished hung at exit. Once imported, the
# import in __del__ is a sys.modules lookup that takes no lock.
import deepspeed.module_inject.auto_ep_comm
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from pipeline.config import FP16_PENALTY_REFUSED, STAGE_0_REFUSED, Config, OptimizerConfig
from pipeline.dist import DistInfo, teardown
from pipeline.errors import NonFiniteLoss, UserError
from pipeline.files import load_tensors

# Each engine saves into a folder of its own, under this tag: DeepSpeed's default tag
# (global_step{N}) and `latest` file would collide if G and D shared one.
ENGINE_TAG = "engine"
# The plain classes DeepSpeed pickles into its ZeRO and bf16 optimizer files (0.19.8): allowed
# in the weights_only check of Engine.load, which refused every such checkpoint without them.
DEEPSPEED_FILE_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def init_distributed(info: DistInfo, timeout_minutes: float) -> None:
    """All ranks. auto_mpi_discovery off: without the env vars it would try MPI and fail on mpi4py.

    On CPU, DeepSpeed JIT-compiles its shm comm op here, into TORCH_EXTENSIONS_DIR (read by
    torch.utils.cpp_extension when it builds). A cache shared by several environments rebuilds
    it whenever another venv's DeepSpeed sources were used last, and a process killed mid-build
    leaves a lock file that makes every later load wait forever. One cache per environment,
    unless the user chose one, avoids both."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    # A process that exits with its process group alive can abort in interpreter finalization
    # ("terminate called without an active exception", SIGABRT): gloo's worker threads still
    # hold work whose tensors reference Python objects (pytorch/pytorch#179291, which proposes
    # the same handler). The CLI tears down on every path; this covers whatever else calls
    # init_distributed (test jobs, benchmarks) on an exception path. Bounded, and a no-op once
    # the group is gone.
    atexit.register(teardown)
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


def build_ds_config(config: Config, network: str, parameters: int) -> dict:
    """The DeepSpeed config of one engine ("g" or "d", a network of `parameters` elements), from
    our config or the user's raw JSON."""
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
    zero = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        # DeepSpeed's default buckets hold 5e8 elements (about 1 GB per fp16 engine) whatever
        # the model's size; one bucket the size of the network is all a DCGAN needs.
        # Rounded up to whole KiB of elements: ZeRO asserts an all-gather bucket of an even size.
        bucket = -(-max(parameters, 1) // 1024) * 1024
        zero |= {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        if ds.precision == "fp32" and ds.gradient_clipping == 0:
            # At fp32, ZeRO 1-2 checks its gradient norm for inf/NaN with a bool() on the device
            # (stage_1_and_2.py step, runtime/utils.py is_invalid_grad_norm): a wait every step.
            # Unclipped, nothing needs that norm; it is not logged then (grad_norm_D/G absent).
            zero["compute_grad_norm"] = False
    result = {
        "train_micro_batch_size_per_gpu": config.data.batch_per_rank,
        "gradient_accumulation_steps": ds.gradient_accumulation,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "fp16": fp16,
        # check_grad_overflow off: at ZeRO 1-2 it reads an overflow flag and the norm's
        # finiteness back every step (stage_1_and_2.py has_overflow, is_invalid_grad_norm). bf16
        # has fp32's range, so a non-finite gradient means divergence, not a loss scale to
        # lower; Divergence (pipeline/stopping.py) stops a run whose losses stay non-finite.
        "bf16": {"enabled": ds.precision == "bf16", "check_grad_overflow": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronizes the whole device at
        # each forward and step (deepspeed/utils/timer.py ThroughputTimer.start/stop); its
        # hook sits on the module, so even a raw module forward fires it. We time steps ourselves.
        "timers": {"throughput": {"enabled": False}},
    }
    if ds.precision != "fp32":
        result["data_types"] = {"buffer_dtype": ds.precision}
    return result


def _checked_raw(raw: dict, config: Config, network: str, path: str) -> dict:
    """A user's DeepSpeed JSON: batch keys must agree with ours; clipping made explicit (#8068);
    the throughput timer off unless the JSON asks for it (it synchronizes the device)."""
    expected = {
        "train_micro_batch_size_per_gpu": config.data.batch_per_rank,
        "gradient_accumulation_steps": config.deepspeed.gradient_accumulation,
    }
    for key, value in expected.items():
        if raw.setdefault(key, value) != value:
            raise UserError(f"{path}: {key} is {raw[key]} but the config says {value}; make them agree")
    raw.pop("train_batch_size", None)  # derived from the two above and the world size
    raw.setdefault("gradient_clipping", 0.0)
    stage = raw.get("zero_optimization", {}).get("stage", 0)
    for precision, reason in STAGE_0_REFUSED.items():
        if raw.get(precision, {}).get("enabled", False) and stage == 0:
            raise UserError(f"{path}: {precision} needs zero_optimization.stage >= 1: {reason}")
    fp16 = raw.get("fp16", {}).get("enabled", False)
    if network == "d" and fp16 and config.loss.has_penalty and config.model.d_norm == "batch":
        raise UserError(f"{path}: {FP16_PENALTY_REFUSED}")  # as config validation refuses its own fp16
    raw.setdefault("steps_per_print", 1 << 30)
    raw.setdefault("timers", {"throughput": {"enabled": False}})
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
        self.name, self.load_universal = name, load_universal
        self.ds_config = build_ds_config(config, name, sum(p.numel() for p in model.parameters()))
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

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        return self.engine(*inputs)

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
        try:
            engine.step()
        except Exception as exc:
            # DeepSpeed's DynamicLossScaler raises a bare Exception when an overflow comes at the
            # minimum scale (deepspeed/runtime/fp16/loss_scaler.py update_scale, 0.19.8).
            if "loss scale already at minimum" not in str(exc):
                raise
            raise NonFiniteLoss(
                f"{self.name.upper()}'s fp16 gradients overflowed at the minimum loss scale "
                f"(deepspeed.fp16_min_loss_scale={self.ds_config['fp16'].get('min_loss_scale')}); training "
                "diverged. Lower the learning rates, use bf16 or fp32, or enable gradient clipping."
            ) from None
        if not boundary or not self.step_applied:
            return None  # an fp16 update skipped after an overflow: its norm (inf) is no figure
        return norm if engine.get_global_grad_norm() is None else engine.get_global_grad_norm()

    @property
    def step_applied(self) -> bool:
        """Whether the last step() updated the weights: False after an fp16 overflow (a host-side
        flag: DeepSpeed has already read the overflow back to decide)."""
        return self.engine.was_step_applied()

    def eager_forward(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        """The raw network's forward, never compiled: for the gradient penalties, whose double
        backward torch.compile's aot_autograd does not support ("torch.compile with aot_autograd
        does not currently support double backward", torch/_functorch/_aot_autograd). No hooks
        run either, as with `module` (ZeRO stages 0-2 need none on a raw forward)."""
        return self.module.forward(*inputs)

    def compile(self, backend: str) -> None:
        """torch.compile the network in place, the way DeepSpeed supports it (engine.compile, which
        calls nn.Module.compile): the engine and `module` both run the compiled forward, and the
        state dict keeps its keys; `eager_forward` does not. Compilation itself happens in the
        first steps."""
        self.engine.compile(backend=backend)

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
                if not (universal / UNIVERSAL_COMPLETE).is_file():  # none, or half-made: (re)build it
                    shutil.rmtree(universal, ignore_errors=True)
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
    """Whether each rank saves its own part of the optimizer state: with ZeRO stage 1 or 2."""
    return ds_config.get("zero_optimization", {}).get("stage", 0) > 0


def _flattens_parameters(ds_config: dict) -> bool:
    """Whether DeepSpeed's optimizer keeps its own flat or partitioned copies of the parameters
    (fp16, bf16, ZeRO) rather than updating the module's tensors with the torch optimizer."""
    half = any(ds_config.get(key, {}).get("enabled", False) for key in ("fp16", "bf16"))
    return half or partitions_optimizer(ds_config)


# Written last inside a universal copy: a folder without it (copied in part, damaged, or made
# by a version that did not mark it) is converted again rather than trusted.
UNIVERSAL_COMPLETE = "complete"


def _convert_to_universal(folder: Path, universal: Path) -> None:
    """Rank 0: DeepSpeed's converter from an engine folder to a universal checkpoint, written
    to a temporary folder, marked complete and renamed, so a kill midway leaves nothing
    half-made."""
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
    (partial / UNIVERSAL_COMPLETE).write_text("")
    os.replace(partial, universal)


def accelerator():
    """DeepSpeed's accelerator object (its timers and optimizers call its synchronize()): for
    pipeline/device_waits.py, which counts those calls."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def compute_dtype(config: Config) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.deepspeed.precision]
