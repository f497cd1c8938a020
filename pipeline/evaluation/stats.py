"""Feature statistics in float64, the Frechet distance and KID, and their cross-rank reduction.

Which ranks run it: every rank accumulates its own images' features; `all_reduce` /
`all_gather_rows` are collectives (every rank calls them, in the same order) and leave the
same result on every rank. Without an initialised process group they are identities.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pipeline.evaluation.inception import FEATURE_DIM


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """nccl reduces CUDA tensors, gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return tensor
    moved = tensor.to(_comm_device())
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def all_gather_rows(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated and sorted by `order` (a global index per row), so the
    result does not depend on how the rows were spread over the ranks. Collective."""
    if _distributed():
        device = _comm_device()
        counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, torch.tensor([rows.shape[0]], device=device))
        longest = max(int(c) for c in counts)
        padded_rows = torch.zeros(longest, rows.shape[1], dtype=rows.dtype, device=device)
        padded_order = torch.full((longest,), -1, dtype=torch.long, device=device)
        padded_rows[: rows.shape[0]] = rows.to(device)
        padded_order[: rows.shape[0]] = order.to(device)
        row_parts = [torch.empty_like(padded_rows) for _ in counts]
        order_parts = [torch.empty_like(padded_order) for _ in counts]
        dist.all_gather(row_parts, padded_rows)
        dist.all_gather(order_parts, padded_order)
        rows = torch.cat([p[: int(c)] for p, c in zip(row_parts, counts, strict=True)]).cpu()
        order = torch.cat([p[: int(c)] for p, c in zip(order_parts, counts, strict=True)]).cpu()
    return rows.cpu()[torch.argsort(order.cpu())]


def broadcast_tensor(tensor: torch.Tensor | None) -> torch.Tensor:
    """Rank 0's tensor on every rank (others pass None). Collective."""
    if not _distributed():
        return tensor
    meta = [(tuple(tensor.shape), tensor.dtype) if tensor is not None else None]
    dist.broadcast_object_list(meta, src=0)
    shape, dtype = meta[0]
    device = _comm_device()
    buffer = tensor.to(device) if tensor is not None else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(buffer, src=0)
    return buffer.cpu()


def broadcast_object(obj):
    """Rank 0's picklable value on every rank (our own values between our own ranks). Collective."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class FeatureStats:
    """Running sum and sum of outer products of features, in float64."""

    def __init__(self, dim: int = FEATURE_DIM, device: torch.device | str = "cpu"):
        self.n = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        f = features.to(self.total.device, torch.float64)
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def reduce(self) -> FeatureStats:
        """Collective: sums over all ranks (float64), the same on every rank afterwards."""
        packed = torch.cat(
            [
                torch.tensor([float(self.n)], dtype=torch.float64, device=self.total.device),
                self.total,
                self.outer.flatten(),
            ]
        )
        packed = all_reduce_sum(packed)
        self.n = int(packed[0].item())
        self.total = packed[1 : 1 + self.total.numel()].clone()
        self.outer = packed[1 + self.total.numel() :].reshape(self.outer.shape).clone()
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (as numpy.cov), float64."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.n}")
        mu = (self.total / self.n).cpu().numpy()
        cov = (self.outer.cpu().numpy() - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), float64.

    Tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2): that matrix is symmetric
    positive semi-definite, so a symmetric eigensolver suffices. Unlike a general sqrtm it has
    no complex round-off to discard, and it avoids scipy 1.11.2-1.11.3's wrong sqrtm (scipy#19415)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def kid_subset_sum(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    subsets: range,
    subset_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> float:
    """Sum over the given subset indices of the unbiased MMD^2 with the kernel (x.y/d + 1)^3.

    Subset s draws its rows from a generator seeded with (seed, s), so any split of the subset
    indices over ranks adds up to the same total."""
    d = features_a.shape[1]
    m = min(subset_size, features_a.shape[0], features_b.shape[0])
    total = 0.0
    for s in subsets:
        g = torch.Generator().manual_seed(seed * 100_003 + s)
        x = features_a[torch.randperm(features_a.shape[0], generator=g)[:m]].to(device, torch.float64)
        y = features_b[torch.randperm(features_b.shape[0], generator=g)[:m]].to(device, torch.float64)
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        total += float(within - 2 * k_xy.mean())
    return total


def kid(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> float:
    """KID: the mean over `subsets` subsets. Collective when distributed: rank r computes the
    subsets r, r + W, ...; one all-reduce adds them up, so every rank returns the same value."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    local = kid_subset_sum(features_a, features_b, range(rank, subsets, world), subset_size, seed, device)
    return float(all_reduce_sum(torch.tensor([local], dtype=torch.float64)).item()) / subsets


def _kth_neighbour_radii(features: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Each row's distance to its k-th nearest neighbour in the same set (the row itself, at
    distance 0, is the first of the k + 1 nearest, as in the prdc package)."""
    return torch.cat(
        [
            torch.cdist(features[i : i + block], features).kthvalue(k + 1, dim=1).values
            for i in range(0, len(features), block)
        ]
    )


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, standard deviation over `splits`) of exp(E_x KL(p(y|x) || p(y))), the Inception
    Score of Salimans et al. 2016 (arXiv:1606.03498), as their code computes it
    (openai/improved-gan, inception_score/model.py): p(y|x) the softmax of each image's logits,
    p(y) the mean over the images of a split, consecutive equal splits, the population standard
    deviation. In float64."""
    probabilities = torch.softmax(logits.double(), dim=1)
    n, scores = len(probabilities), []
    for i in range(splits):
        part = probabilities[i * n // splits : (i + 1) * n // splits]
        kl = part * (torch.log(part) - torch.log(part.mean(dim=0, keepdim=True)))
        scores.append(torch.exp(kl.sum(dim=1).mean()))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def precision_recall_density_coverage(
    real: torch.Tensor, fake: torch.Tensor, k: int = 5, block: int = 1024, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Precision and recall (Kynkäänniemi et al. 2019, arXiv:1904.06991), density and coverage
    (Naeem et al. 2020, arXiv:2002.09797) of two feature sets, as the authors' `prdc` package
    computes them (Euclidean k-NN balls; tests/test_fid.py holds us to it): precision, the share
    of fake rows inside some real row's ball; recall, of real rows inside some fake row's ball;
    density, the mean count of real balls holding a fake row, over k; coverage, the share of
    real balls holding a fake row. In float64, a block of real rows at a time, so memory is
    block x rows rather than rows^2 (10,000 rows: 80 MB, not 800 MB per distance matrix)."""
    real, fake = real.to(device, torch.float64), fake.to(device, torch.float64)
    real_radii, fake_radii = _kth_neighbour_radii(real, k, block), _kth_neighbour_radii(fake, k, block)
    in_real_balls = torch.zeros(len(fake), dtype=torch.float64, device=device)  # per fake row: real balls holding it
    recalled = covered = 0
    for i in range(0, len(real), block):
        distances = torch.cdist(real[i : i + block], fake)  # real rows x fake rows
        in_real_balls += (distances < real_radii[i : i + block, None]).sum(dim=0)
        recalled += int((distances < fake_radii[None, :]).any(dim=1).sum())
        covered += int((distances.min(dim=1).values < real_radii[i : i + block]).sum())
    return {
        "precision": float((in_real_balls > 0).double().mean()),
        "recall": recalled / len(real),
        "density": float(in_real_balls.mean()) / k,
        "coverage": covered / len(real),
    }
