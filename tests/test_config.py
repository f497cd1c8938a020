"""Config: typed, validated, with overrides; errors name the key, the origin and what was expected."""

import pytest
import yaml

from pipeline.config import Config, config_to_yaml, load_config, parse_override
from pipeline.errors import ConfigError
from tests.conftest import REPO, run_cli


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_file_then_overrides_take_precedence(tmp_path):
    path = write(tmp_path, "seed: 3\ndata:\n  batch_per_rank: 16\n  workers: 1\n")
    config = load_config(path, ["data.batch_per_rank=128", "data.shuffle=false"])
    assert config.seed == 3
    assert config.data.batch_per_rank == 128  # override beats file
    assert config.data.workers == 1  # file beats default
    assert config.data.shuffle is False
    assert config.data.epoch_remainder == "drop"  # default


def test_shipped_configs_validate():
    for path in (REPO / "configs").glob("*.yaml"):
        assert isinstance(load_config(path), Config)


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: 16\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "data.batch_size: unknown key" in message
    assert str(path) in message
    assert "did you mean 'batch_per_rank'" in message


def test_wrong_type_and_range_are_both_reported(tmp_path):
    path = write(tmp_path, "data:\n  workers: many\n  batch_per_rank: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "data.workers: Input should be a valid integer" in message and "'many'" in message
    assert "data.batch_per_rank: Input should be greater than or equal to 1" in message


def test_string_fields_keep_override_text_that_yaml_would_convert():
    config = load_config(None, ["train.run_name=off", "tracking.experiment=1e3", "data.split=2024", "seed=7"])
    assert (config.train.run_name, config.tracking.experiment, config.data.split) == ("off", "1e3", "2024")
    assert config.seed == 7  # non-string fields still parse as YAML


def test_literal_choices_are_named():
    with pytest.raises(ConfigError, match="data.epoch_remainder: Input should be 'drop' or 'pad'.*command-line"):
        load_config(None, ["data.epoch_remainder=wrap"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("data.workers")
    with pytest.raises(ConfigError, match="seed: Input should be a valid integer.*command-line override"):
        load_config(None, ["seed.x=1"])
    with pytest.raises(ConfigError, match="seed: is a value, not a section"):
        load_config(None, ["seed=1", "seed.x=1"])
    assert parse_override("data.shards=a=b.tar") == (["data", "shards"], "a=b.tar")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_print_config_round_trips(tmp_path):
    result = run_cli("stream", "--config", REPO / "configs/mnist32.yaml", "data.workers=5", "--print-config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["data"]["workers"] == 5
    assert load_config(None, []).model_validate(printed) == load_config(
        REPO / "configs/mnist32.yaml", ["data.workers=5"]
    )
    assert config_to_yaml(Config()).startswith("seed: 0")


def test_cli_config_error_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "data:\n  workerz: 2\n")
    result = run_cli("stream", "--config", path)
    assert result.returncode == 2
    assert "data.workerz: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_has_help():
    for command in ("prepare", "stream"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "mnist", "out", "--limit", "-5"], "argument --limit: must be >= 1, got -5"),
        (["prepare", "mnist", "out", "--workers", "-1"], "argument --workers: must be between 1 and 256, got -1"),
        (["prepare", "mnist", "out", "--val-fraction", "1"], "argument --val-fraction: must be below 1, got 1"),
        (["prepare", "mnist", "out", "--quality", "0"], "argument --quality: must be between 1 and 100, got 0"),
        (["eval", "--checkpoint", "x", "--n-gen", "-3"], "argument --n-gen: must be >= 2, got -3"),
        (["eval", "--checkpoint", "x", "--n-gen", "0"], "argument --n-gen: must be >= 2, got 0"),
        (["eval", "--checkpoint", "x", "--n-ref", "-5"], "argument --n-ref: must be >= 2, got -5"),
        (["sample", "--checkpoint", "x", "--n", "0"], "argument --n: must be between 1 and 100000, got 0"),
        (["sample", "--checkpoint", "x", "--seed", "18446744073709551616"], "argument --seed: must be between 0"),
        (["prepare", "mnist", "out", "--limit", "ten"], "argument --limit: expected an integer, got 'ten'"),
    ],
)
def test_numeric_arguments_are_checked_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    """Out of range, a number is refused by the parser: usage and one line naming the option,
    exit 2, nothing made (prepare --limit -5 used to prepare all but the last 5 images)."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_a_seed_beyond_32_bits_is_a_config_error():
    """It used to reach torch as an 'Overflow when unpacking long long' traceback."""
    with pytest.raises(ConfigError, match="seed: Input should be less than or equal to 4294967295"):
        load_config(None, ["seed=18446744073709551616"])
