"""Run configuration: presets, aliases, overrides, clear errors. `pytest tests/test_config.py -q`"""
import pytest
import yaml

from refinevla import config


def test_presets_resolve_and_differ():
    smoke, default = config.resolve("smoke"), config.resolve("default")
    assert smoke.model.size == "micro" and default.model.size in config.model_sizes() and default.model.size != "micro"
    assert smoke.data.episodes_per_task < default.data.episodes_per_task
    assert set(config.list_presets()) >= {"smoke", "default", "study", "paper"}


def test_paper_preset_names_a_real_checkpoint_and_http_teacher():
    paper = config.resolve("paper")
    assert paper.model.checkpoint and paper.annotate.teacher == "http"
    assert "KEY" in paper.annotate.api_key_env  # the name of a variable, never a key


def test_alias_dotted_and_unique_field_overrides():
    cfg = config.resolve("smoke", {"lambda_reason": "0.25", "pretrain.lr": "3e-4", "finetune_steps": 7})
    assert cfg.refinevla.lambda_reason == 0.25
    assert cfg.pretrain.lr == pytest.approx(3e-4)
    assert cfg.baseline.steps == 7 and cfg.refinevla.steps == 7
    cfg = config.resolve("smoke", {"tasks": "lift,stack"})
    assert list(cfg.data.tasks) == ["lift", "stack"] and list(cfg.evaluate.tasks) == ["lift", "stack"]


def test_notebook_params_none_keeps_preset():
    cfg = config.notebook_config("smoke", "", {"lambda_reason": None, "tune_top_k_layers": 1, "unrelated": 3})
    assert cfg.refinevla.lambda_reason == config.resolve("smoke").refinevla.lambda_reason
    assert cfg.model.tune_top_k_layers == 1
    assert config.notebook_config("smoke", "myrun").name == "myrun"


def test_unknown_key_and_ambiguous_key_errors():
    with pytest.raises(KeyError, match="unknown config key"):
        config.resolve("smoke", {"no_such_key": 1})
    with pytest.raises(KeyError, match="ambiguous"):
        config.resolve("smoke", {"steps": 3})  # in pretrain, baseline and refinevla
    with pytest.raises(KeyError, match="pretrain"):
        config.resolve("smoke", {"pretrain.nope": 1})


def test_unknown_preset_and_bad_values():
    with pytest.raises(ValueError, match="unknown preset"):
        config.resolve("huge")
    with pytest.raises(ValueError, match="model.size"):
        config.resolve("smoke", {"model_size": "giant"})
    with pytest.raises(ValueError, match="quantization"):
        config.resolve("smoke", {"quantization": "3bit"})


def test_saved_config_round_trips(tmp_path):
    cfg = config.resolve("smoke", {"lambda_reason": 0.7})
    cfg.save(tmp_path / "config.yaml")
    again = config.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again.refinevla.lambda_reason == 0.7 and again.to_dict() == cfg.to_dict()


def test_config_hash_changes_with_values():
    a, b = config.resolve("smoke"), config.resolve("smoke", {"lambda_reason": 0.9})
    assert config.config_hash(a.refinevla) != config.config_hash(b.refinevla)
    assert config.config_hash(a.baseline) == config.config_hash(b.baseline)
