"""Paper-scale data through the same stages: a dataset in LeRobot v2 layout -> data -> HTTP teacher -> fine-tune.

The dataset is written by the test (tests/lerobot_fixture.py) and the teacher is the real openai client against a
local chat-completions server (tests/chat_server.py): no hub is reachable here. `pytest tests/test_lerobot_pipeline.py`
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer  # noqa: E402
from lerobot_fixture import write_lerobot_fixture  # noqa: E402

from refinevla import config, pipeline  # noqa: E402
from refinevla.schema import BASE_COLUMNS, RATIONALE_COLUMNS  # noqa: E402


def test_lerobot_dataset_runs_through_data_annotate_and_finetune(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-test-lerobot-0000")
    fixture = write_lerobot_fixture(tmp_path / "src", flavour="bridge", lengths=(6, 5))
    with ChatServer() as server:
        cfg = config.resolve("smoke", {
            "dataset": str(fixture.root), "data.episodes": "0:2", "data.stride": 2, "image_size": 32,
            "teacher": "http", "base_url": server.url, "teacher_model": "gpt-4o-mini",
            "annotate.api_key_env": "TEST_TEACHER_KEY", "annotate.backoff_s": 0.01,
        })
        cfg.root, cfg.name = str(tmp_path / "data"), "bridge-fixture"
        demos = pipeline.run_data(cfg)
        assert set(BASE_COLUMNS) <= set(demos.column_names)
        assert len(demos) == 3 + 3  # every 2nd frame of 6 and 5 frames
        annotated = pipeline.run_annotate(cfg)
        assert len(server.requests) == len(demos)
    assert set(RATIONALE_COLUMNS) <= set(annotated.column_names)
    assert all(t for t in annotated["rationale_text"])
    # the fine-tuning stages consume it unchanged (the tiny base is pre-trained on it first)
    models = pipeline.run_train(cfg)
    assert (Path(models[("refinevla", 0)]) / "vla.json").exists()
    # a re-run is skipped by the stage markers and sends no request
    with ChatServer() as again:
        cfg.annotate.base_url = again.url
        pipeline.run_annotate(cfg)
        assert len(again.requests) == 0


def test_data_notebook_runs_on_a_lerobot_dataset(tmp_path):
    """The data notebook with the `dataset` parameter, through Papermill, exactly as on the robosuite default."""
    import papermill as pm

    fixture = write_lerobot_fixture(tmp_path / "src", flavour="bridge", lengths=(6, 5))
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "01_data.ipynb"
    out = tmp_path / "01_data.ipynb"
    pm.execute_notebook(str(notebook), str(out), cwd=str(tmp_path), kernel_name="python3", progress_bar=False,
                        parameters=dict(preset="smoke", run="lerobot", dataset=str(fixture.root), image_size=32,
                                        overrides={"data.episodes": "0:2", "root": str(tmp_path / "data")}))
    executed = out.read_text()
    assert "bridge_orig_lerobot" in executed  # the task column of the LeRobot rows, in the stats and frames
    assert (tmp_path / "data" / "lerobot" / "demos" / "_done.json").exists()
