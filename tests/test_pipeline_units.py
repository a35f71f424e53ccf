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
    from refinevla.simpler import SimulatorNotInstalledError

    cfg = config.resolve("paper")
    with pytest.raises(SimulatorNotInstalledError, match="SimplerEnv"):
        pipeline.run_simpler_backend(lambda: None, cfg.evaluate, tmp_path)


def test_pretrain_is_skipped_for_a_real_checkpoint():
    cfg = config.resolve("smoke", {"checkpoint": "google/paligemma2-3b-pt-224"})
    assert pipeline.run_pretrain(cfg) == "google/paligemma2-3b-pt-224"
    assert pipeline.base_model_dir(cfg) == "google/paligemma2-3b-pt-224"
