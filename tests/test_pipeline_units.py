"""Stage plumbing without running the stages: markers, keys, the SimplerEnv branch. `pytest tests/test_pipeline_units.py`"""
import pytest

from refinevla import config, pipeline


def test_stage_key_follows_config_and_upstream_markers(tmp_path):
    cfg = config.resolve("smoke")
    up = tmp_path / "up"
    up.mkdir()
    k1 = pipeline.stage_key([cfg.refinevla], [up])
    pipeline.mark_done(up, "abc", cfg, started=0.0)
    k2 = pipeline.stage_key([cfg.refinevla], [up])
    assert k1 != k2  # an upstream stage that (re)ran changes the key
    assert pipeline.is_done(up, "abc") and not pipeline.is_done(up, "other")
    assert (up / "config.yaml").exists()
    cfg.refinevla.lambda_reason = 0.9
    assert pipeline.stage_key([cfg.refinevla], [up]) != k2


def test_paper_backend_without_simulator_says_how_to_install(tmp_path):
    from refinevla.backends import SimulatorNotInstalledError
    from refinevla.evaluate import evaluate

    cfg = config.resolve("paper")
    with pytest.raises(SimulatorNotInstalledError, match="SimplerEnv"):
        evaluate(lambda: None, cfg.evaluate, tmp_path)  # the one harness sends the paper backend to SimplerEnv


def test_pretrain_is_skipped_for_a_real_checkpoint():
    cfg = config.resolve("smoke", {"checkpoint": "google/paligemma2-3b-pt-224"})
    assert pipeline.run_pretrain(cfg) == "google/paligemma2-3b-pt-224"
    assert pipeline.base_model_dir(cfg) == "google/paligemma2-3b-pt-224"


def test_a_training_stage_resumes_only_its_own_checkpoints(tmp_path):
    """A checkpoint written under another config (or by a version that wrote no key) is deleted, not resumed:
    resuming it would train a model the run's config does not describe."""
    from refinevla.pipeline import start_stage

    out = tmp_path / "train" / "pretrain"
    (out / "ckpt" / "ckpt-0001000").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1000}\n')
    (out / "_done.json").write_text("{}")
    start_stage(out, "key-a")  # no _key: written by an older version, of unknown config
    assert not (out / "ckpt").exists() and not (out / "metrics.jsonl").exists() and not (out / "_done.json").exists()
    assert (out / "_key").read_text() == "key-a"

    (out / "ckpt" / "ckpt-0000200").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 200}\n')
    start_stage(out, "key-a")  # the same config, killed: resumed
    assert (out / "ckpt" / "ckpt-0000200").exists() and (out / "metrics.jsonl").exists()
    start_stage(out, "key-b")  # another config
    assert not (out / "ckpt").exists() and (out / "_key").read_text() == "key-b"


def test_every_arm_is_evaluated_and_the_oracle_switch_leaves_the_others_alone(tmp_path):
    from refinevla.config import resolve
    from refinevla.pipeline import BASE, ORACLE, evaluate_key, evaluated_units

    off = resolve("smoke", {"root": str(tmp_path), "study.oracle": False})
    on = resolve("smoke", {"root": str(tmp_path), "study.oracle": True})
    assert evaluated_units(off) == [(BASE, -1), ("baseline", 0), ("baseline", 1), ("refinevla", 0),
                                    ("refinevla", 1), ("dropout", 0), ("after", 0)]
    assert evaluated_units(on) == evaluated_units(off) + [(ORACLE, 0)]
    for arm, seed in evaluated_units(off):  # turning the oracle on re-runs nothing else
        assert evaluate_key(on, arm, seed) == evaluate_key(off, arm, seed)
    assert evaluate_key(on, ORACLE, 0) != evaluate_key(on, "refinevla", 0)
    simpler = resolve("smoke", {"root": str(tmp_path), "study.oracle": True, "evaluate.backend": "simpler"})
    assert ORACLE not in {arm for arm, _ in evaluated_units(simpler)}  # SimplerEnv gives no object poses


def test_a_bad_evaluation_config_is_refused_before_finished_episodes_are_deleted(tmp_path):
    with pytest.raises(ValueError, match="sideways"):  # refused when the config is resolved ...
        config.resolve("smoke", {"root": str(tmp_path), "eval_splits": "in_distribution,sideways"})
    cfg = config.resolve("smoke", {"root": str(tmp_path)})
    cfg.evaluate.splits = ["in_distribution", "sideways"]  # ... and by the stage, when set after resolving
    out = pipeline.evaluate_dir(cfg, "base", -1)
    out.mkdir(parents=True)
    (out / "episodes.jsonl").write_text('{"task": "pick_cube", "split": "in_distribution", "seed": 10000}\n')
    (out / "_key").write_text("an older key")
    with pytest.raises(ValueError, match="sideways"):
        pipeline.run_evaluate(cfg)
    assert (out / "episodes.jsonl").exists()


def test_the_mixture_key_follows_its_randomized_share():
    """Recorded mixture episodes are reused only by a run that asks for the same share of randomized scenes (a
    default-scene mixture keeps the key it had before the share existed)."""
    cfg = config.resolve("base")
    default = pipeline._pretrain_data_key(cfg)
    cfg.data.pretrain_variant_share = 0.5
    assert pipeline._pretrain_data_key(cfg) != default
    cfg.data.pretrain_variant_share = 0.0
    assert pipeline._pretrain_data_key(cfg) == default
