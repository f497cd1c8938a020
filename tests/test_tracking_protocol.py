"""The tracking package's contracts, without a training run: the Tracker protocol that both
trackers keep, the run description (a pure function), and the delivery queue's order and limit.
(Delivery through a real outage: test_tracking.py, with a real `mlflow server` stopped and restarted.)"""

import inspect

import pytest

from pipeline.config import load_config
from pipeline.dist import DistInfo
from pipeline.tracking import NullTracker, Tracker, delivery
from pipeline.tracking.describe import DatasetRef, Resumption, describe_run, open_run
from pipeline.tracking.mlflow_tracker import MlflowTracker

PROTOCOL_METHODS = sorted(
    name for name, member in vars(Tracker).items() if inspect.isfunction(member) and not name.startswith("_")
)


def test_the_protocol_names_every_call_the_training_run_makes():
    calls = ["start", "log_params", "log_metrics", "log_artifact", "log_image", "set_tags", "log_dataset"]
    assert sorted([*calls, "log_model", "update_parent", "sync", "finish", "where"]) == PROTOCOL_METHODS


@pytest.mark.parametrize("tracker_class", [NullTracker, MlflowTracker])
def test_each_tracker_keeps_the_protocol_signatures(tracker_class):
    for name in PROTOCOL_METHODS:
        ours = inspect.signature(getattr(tracker_class, name))
        wanted = inspect.signature(getattr(Tracker, name))
        assert list(ours.parameters) == list(wanted.parameters), (tracker_class.__name__, name, ours, wanted)


def test_the_mlflow_tracker_implements_every_protocol_method():
    """An inherited do-nothing body would drop records silently."""
    missing = [name for name in PROTOCOL_METHODS if name not in vars(MlflowTracker)]
    assert missing == []


def test_the_null_tracker_accepts_every_call_and_has_no_run():
    tracker = NullTracker()
    assert tracker.start("r") is None and tracker.run_id is None and tracker.where() is None
    tracker.log_metrics({"loss_D": 1.0}, 1)
    tracker.finish("FINISHED")


class Recorder(Tracker):
    """A Tracker that keeps every call, to read what open_run sends."""

    def __init__(self):
        self.calls = []
        for name in PROTOCOL_METHODS:
            setattr(self, name, lambda *args, _name=name, **kwargs: self.calls.append((_name, args, kwargs)))


def description(tmp_path, *overrides, fid=None, cli=()):
    config = load_config(None, list(overrides))
    info = DistInfo("torchrun", 0, 0, 2, 2, __import__("torch").device("cpu"), "gloo", 0)
    data = DatasetRef("mnist32:train", "ab" * 32, "/data/mnist32/manifest.json", {"num_samples": 100})
    manifest = {"count": 100, "resolution": 32, "channels": 1, "_hash": "ab" * 32}
    versions = {"torch": "2.x", "git_commit": "c0ffee"}
    ds = {"g": {"train_batch_size": 64}, "d": {"train_batch_size": 64}}
    return describe_run(config, info, tmp_path / "run", ds, data, manifest, versions, fid, list(cli), "mnist32")


def test_a_run_is_described_without_mlflow(tmp_path):
    described = description(
        tmp_path, "tracking.tags={team: gan}", cli=["train.g_optim.lr=1e-3", "tracking.uri=http://u:pw@h/x"]
    )
    assert described.run_name == "mnist32 g_optim.lr=1e-3"
    assert described.tags["run_dir"] == str((tmp_path / "run").resolve())
    assert described.tags["team"] == "gan" and described.tags["mlflow.source.git.commit"] == "c0ffee"
    assert "pw" not in described.tags["overrides"]
    params = described.params
    assert params["config.train.g_optim.lr"] == load_config(None, []).train.g_optim.lr  # the config as built
    assert params["ds_g.train_batch_size"] == 64 and params["world_size"] == 2 and params["launcher"] == "torchrun"
    assert params["version.torch"] == "2.x" and params["git_commit"] == "c0ffee" and "version.git_commit" not in params
    assert [(d.name, context) for d, context in described.datasets] == [("mnist32:train", "training")]
    assert [p.name for p, _ in described.artifacts] == ["config.yaml", "ds_config_g.json", "ds_config_d.json"]


def test_the_fid_reference_is_an_evaluation_dataset(tmp_path):
    reference = {"source": "/data/mnist32_test/manifest.json", "split": "test", "n": 500}
    described = description(tmp_path, fid={"reference": reference, "protocol": {"name": "p"}})
    assert [(d.name, context) for d, context in described.datasets][1] == ("mnist32_test:test", "evaluation")
    assert described.tags["fid.n_reference"] == 500


def test_open_run_records_a_new_run_whole_and_a_resumed_one_by_what_changed(tmp_path):
    described = description(tmp_path)
    new = Recorder()
    open_run(new, described, 2)
    kinds = [name for name, _, _ in new.calls]
    assert kinds[0] == "start" and {"log_params", "log_dataset", "log_artifact"} <= set(kinds)
    resumed = Recorder()
    open_run(resumed, described, 4, False, Resumption("run-1", 10, resize="2 -> 4 ranks"))
    assert resumed.calls[0][2]["run_id"] == "run-1"
    kinds = [name for name, _, _ in resumed.calls]
    assert "log_params" not in kinds and "sync" in kinds
    assert ("log_metrics", ({"world_size": 4}, 10), {}) in resumed.calls


def test_the_queue_coalesces_metrics_in_order_and_drops_the_oldest_past_its_limit():
    queue = delivery.DeliveryQueue(limit=5)
    queue.put(delivery.Metrics([("a", 1.0, 0, 1)] * 2))
    queue.put(delivery.Metrics([("a", 2.0, 0, 2)] * 2))
    tags = delivery.Tags({"k": "v"})
    queue.put(tags)
    queue.put(delivery.Metrics([("a", 3.0, 0, 3)] * 2))  # 6 values > 5: the oldest metrics go
    assert queue.dropped_metrics == 2
    batch = queue.next_batch()
    assert len(batch) == 1 and batch[0].values[0][1] == 2.0  # metrics before the tags, not after
    queue.remove(batch)
    assert queue.next_batch() == [tags]


def test_the_queue_merges_consecutive_metrics_up_to_one_log_batch():
    queue = delivery.DeliveryQueue(limit=10_000)
    for step in range(3):
        queue.put(delivery.Metrics([("a", float(step), 0, step)] * 400))
    batch = queue.next_batch()
    assert len(batch) == 2 and len(delivery.merged(batch).values) == 800  # a third would pass 1000


def test_a_missing_file_is_skipped_with_a_warning_not_retried_as_an_outage(tmp_path, caplog):
    """A real tracker on an sqlite store: an artifact or image whose file is gone cannot come
    back by retrying, so it must not hold the queue (and finish() its whole timeout) as an
    unreachable store does; the metrics behind it are delivered."""
    from pipeline.tracking.mlflow_tracker import MlflowTracker

    config = load_config(None, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.flush_every_s=0.1"])
    tracker = MlflowTracker(config.tracking, tmp_path)
    tracker.start("r")
    tracker.log_artifact(tmp_path / "never-written.yaml", "config")
    tracker.log_image(tmp_path / "gone.png", "samples", 1)
    tracker.log_metrics({"loss_D": 1.0}, 1)
    with caplog.at_level("WARNING", logger="pipeline.tracking"):
        assert tracker.wait_delivered(30)
    tracker.finish("FINISHED")
    assert "never-written.yaml does not exist; not uploaded" in caplog.text and "unreachable" not in caplog.text
    assert [m.value for m in tracker.client.get_metric_history(tracker.run_id, "train/loss_D")] == [1.0]
