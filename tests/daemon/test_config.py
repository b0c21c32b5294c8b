import pytest

from daemon.cli import main
from daemon.config import ConfigError, DaemonConfig, default_yaml, load_config


def test_defaults_are_complete_and_the_printed_default_loads_back(tmp_path):
    path = tmp_path / "default.yaml"
    path.write_text(default_yaml())
    assert load_config(path, environ={}) == DaemonConfig()


def test_precedence_file_then_environment_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  batch_size: 16\n  fresh_frames: 4\nmemory:\n  budget_mb: 20\n")
    env = {"SURGEON_LEARNER__BATCH_SIZE": "24", "SURGEON_MEMORY__BUDGET_MB": "12",
           "SURGEON_SHARED_DIR": "/elsewhere"}   # not a config variable: ignored here
    config = load_config(path, ["memory.budget_mb=9.5"], environ=env)
    assert config.learner.batch_size == 24 and config.learner.fresh_frames == 4
    assert config.memory.budget_mb == 9.5


@pytest.mark.parametrize("override, named", [
    ("learner.batch_size=0", "learner.batch_size"),
    ("learner.bacth_size=8", "learner.bacth_size"),
    ("memory.available_share=2", "memory.available_share"),
    ("source.backend=cuda", "source.backend"),
    ("learner.min_batch_size=128", "learner.min_batch_size"),
    ("model=resnet20", "model"),
    ("duration_s=-1", "duration_s"),
])
def test_a_bad_value_is_refused_and_named(override, named):
    with pytest.raises(ConfigError, match=r"\b%s\b" % named.replace(".", r"\.")):
        load_config(None, [override], environ={})


@pytest.mark.parametrize("text, message", [
    ("learner: [1, 2", "not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_a_malformed_file_is_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_missing_file_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config("/nonexistent/surgeond.yaml", environ={})
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["learner.batch_size"], environ={})


def test_cli_config_commands(tmp_path, capsys):
    assert main(["config", "--print-default"]) == 0
    assert "batch_size: 64" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  batch_size: -3\n")
    assert main(["config", "--check", str(bad)]) == 2
    assert "learner.batch_size" in capsys.readouterr().err
    assert main(["run", "--set", "source.uri=ftp://x"]) == 2
    assert "source.uri" in capsys.readouterr().err
