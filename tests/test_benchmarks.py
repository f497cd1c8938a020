"""The benchmarks that guard the hot path keep running: small CPU runs of the same code paths
they time. Their figures are not asserted (speed is measured by the benchmarks, on a quiet
machine); what is asserted is that every figure is produced and the closing JSON line is whole.
The GPU-only parts of the GPU check (fp16, host-sync counting) run only on a GPU.
bench/exit_codes.py runs in tests/test_exit_codes.py."""

import json
import sys

import pytest

from tests.conftest import REPO, run

# Slow tier: every test here starts processes (launchers, ranks, servers, a cluster).
pytestmark = pytest.mark.slow


def closing_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_gpu_check_runs_on_cpu(dist_single):
    """dist_single first: DeepSpeed's CPU comm op is compiled once, in one process."""
    command = [sys.executable, REPO / "bench/gpu_train_check.py", "--device", "cpu", "--compile-backend", "aot_eager"]
    result = run([*command, "--steps", "1", "--batch", "8", "--resolution", "32", "--warmup", "1"], timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    line = closing_json(result.stdout)
    assert line["benchmark"] == "gpu_train_check" and line["device"] == "cpu"
    ours = ("ours_bf16", "ours_fp32", "ours_fp32_channels_last", "ours_bf16_compile", "ours_bf16_loader_fed")
    assert all(line["figures"][name] > 0 for name in ours), line["figures"]
    assert set(line["baseline"]) == {"plain_bf16", "plain_fp32"} and all(v > 0 for v in line["baseline"].values())
    assert all(len(rounds) == 3 for rounds in line["rounds"].values())
    expected = {"channels_last_on_over_off_fp32_zero0", "compile_on_over_off_bf16", "loader_fed_over_in_memory_bf16"}
    assert expected <= set(line["ratios"]) and 0 <= line["figures"]["loader_fed_data_wait_share"] <= 1
    # The counts themselves are the suite's (tests/test_device_waits.py); here they must be there, and none.
    assert line["figures"]["device_waits_per_step"] == {
        p: {"deepspeed_fp16_overflow": 0.0, "other": 0.0} for p in ("bf16", "fp32")
    }


def test_loader_benchmark_runs(tmp_path):
    command = [sys.executable, REPO / "bench/loader_throughput.py", "--images", "300", "--epochs", "1"]
    result = run([*command, "--resolutions", "32"], timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    line = closing_json(result.stdout)
    figures = line["figures"]["32x32x3"]
    assert line["benchmark"] == "loader_throughput" and line["workers"] == 1
    assert min(figures["raw_images_per_s"], figures["png_images_per_s"], figures["png_folder_images_per_s"]) > 0


def bench(script: str, *args, timeout=300) -> dict:
    """Run bench/SCRIPT with these arguments; its closing JSON line, checked to be whole."""
    result = run([sys.executable, REPO / "bench" / script, *args], timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    line = closing_json(result.stdout)
    assert {"benchmark", "figures", "baseline", "ratio", "machine"} <= set(line) and line["ratio"] > 0
    return line


def test_train_step_benchmark_runs(dist_single):
    line = bench("train_step.py", "--steps", "1", "--rounds", "1", "--batch", "8")
    assert line["figures"]["images_per_s"] > 0 and line["baseline"]["images_per_s"] > 0


def test_checkpoint_io_benchmark_runs(dist_single):
    line = bench("checkpoint_io.py", "--repeats", "1")
    assert line["benchmark"] == "checkpoint_io"


def test_tracking_overhead_benchmark_runs(dist_single):
    line = bench("tracking_overhead.py", "--steps", "1", "--rounds", "1", "--log-model")
    assert line["metrics_delivered"] > 0 and line["models_logged"] >= 1


def test_fid_speed_benchmark_runs():
    line = bench("fid_speed.py", "--n", "20", "--batch-size", "10")
    assert line["benchmark"] == "fid_speed"


def test_resume_time_benchmark_runs():
    line = bench("resume_time.py", "--images", "64", timeout=600)
    assert line["figures"]["same_size_2_to_2_s"] > 0


def test_a_killed_rank_ends_the_job_within_the_bound_under_both_launchers():
    """bench/rank_failure.py once: SIGKILL of local rank 1 under launch/single_node.sh (the
    deepspeed launcher) and launch/torchrun.sh, a loader worker per rank. The deepspeed launcher
    SIGTERMs the other rank and SIGKILLs it 30 s later if it is still there: the job must end,
    failing, well before that under either launcher."""
    line = bench("rank_failure.py", "--repeats", "1")
    assert all(seconds < 25 for seconds in line["figures"]["slowest_seconds_to_end"].values()), line["figures"]
    assert all(code != 0 for codes in line["figures"]["exit_codes"].values() for code in codes), line["figures"]


def test_quality_benchmark_runs_on_its_own_data(tmp_path):
    """The plain loop's path (no launcher: the quickstart's tests cover that one), on small
    shards in tmp_path instead of the checkout's data/."""
    from pipeline.data.prepare import Transform, prepare

    for folder, source in (("mnist32", "mnist"), ("mnist32_test", "mnist:test")):
        prepare(source, tmp_path / folder, Transform(32, 1), limit=64, progress=False)
    line = bench(
        "quality.py", "--plain", "--steps", "2", "--eval-every", "2", "--n", "20",
        "--data-root", tmp_path, "--run-root", tmp_path / "runs", "data.batch_per_rank=8",
    )  # fmt: skip
    assert line["figures"]["step"] == 2 and line["baseline"]["n"] == 20


def test_the_digit_classifier_judges_a_conditional_generator(tmp_path):
    """bench/digit_classifier.py on 256 digits (the benchmark trains it on 60,000): it learns
    something, and class accuracy is a share, per class and overall."""
    sys.path.insert(0, str(REPO / "bench"))
    from digit_classifier import class_accuracy, train_classifier

    from pipeline.data.prepare import Transform, prepare
    from pipeline.models import build_generator

    for folder, source in (("train", "mnist"), ("test", "mnist:test")):
        prepare(source, tmp_path / folder, Transform(32, 1), limit=256, progress=False)
    judge, accuracy = train_classifier(tmp_path / "train", tmp_path / "test", epochs=2)
    assert 0.3 < accuracy <= 1.0  # chance is 0.1
    overall, per_class = class_accuracy(judge, build_generator("dcgan", 32, 1, 100, 16, num_classes=10), n=40)
    assert 0 <= overall <= 1 and len(per_class) == 10 and overall == pytest.approx(sum(per_class) / 10)


def test_scale_plan_benchmark_runs():
    """Small sizes; the coverage check inside it is exact and fails the run if it fails."""
    line = bench("scale_plan.py", "--sizes", "1e5", "--worlds", "8,64", "--elastic", "64,40", "--coverage", "1e5,16,10")
    assert line["figures"]["coverage"]["drop"]["histogram"]["1"] > 0 and line["meets_goal"]


def test_prepare_throughput_benchmark_runs():
    line = bench("prepare_throughput.py", "--images", "40", "--rounds", "1")
    assert line["figures"]["shards_2_workers"] > 0 and line["images"] == 40
