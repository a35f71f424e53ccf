"""Episode videos: the first success and the first failure of each (task, split) as a captioned GIF.

    .venv/bin/python -m pytest -q tests/test_eval_media.py

A real robosuite episode for the frame count and size; the fake backend of test_evaluate.py (success at step 3 on
even seeds) for the success / failure pair, the captions and the lockstep path.
"""
import dataclasses
import functools

import numpy as np
import pytest
from PIL import Image

from refinevla import evaluate as ev
from refinevla.config import EvaluateConfig
from refinevla.media import caption_lines, save_episode_gif
from refinevla.policy import ZeroPolicy


def _frames(path):
    """Every frame of a GIF as an RGB array (the GIF is readable: PIL decodes each one)."""
    gif = Image.open(path)
    out = []
    for k in range(gif.n_frames):
        gif.seek(k)
        out.append(np.asarray(gif.convert("RGB")))
    return out


def test_short_robosuite_episode_gives_a_readable_failure_gif(tmp_path):
    pytest.importorskip("robosuite")
    cfg = EvaluateConfig(tasks=["lift"], seeds=[10_000, 10_001], max_steps=4, image_size=32, strip_frames=0,
                         envs_per_worker=1, progress=False, videos=True)
    df = ev.evaluate(ZeroPolicy, cfg, tmp_path)
    assert not df.success.any() and (df.steps == 4).all()
    videos = tmp_path / "videos"
    assert sorted(p.name for p in videos.iterdir()) == ["lift_in_distribution_failure.gif"]  # no success to show
    frames = _frames(videos / "lift_in_distribution_failure.gif")
    assert len(frames) == 4 + 1  # the observation before each of the 4 steps, and the last one
    h, w, _ = frames[0].shape
    assert w >= 192 and h > w  # upsampled picture, caption band below it
    picture, band = frames[0][:w], frames[0][w:]
    assert picture.std() > 5  # the scene, not a blank
    assert (band.min(axis=2) < 100).sum() > 50  # dark caption text on the white band
    assert not np.array_equal(frames[0][w:], frames[1][w:])  # the step counter moves


class Narrator(ZeroPolicy):
    """Says which step it is acting on (a stand-in for a reasoning policy's rationale: ``last_rationale``)."""

    def reset(self, instruction):
        self.n, self.last_rationale = 0, ""

    def act(self, obs):
        self.n += 1
        self.last_rationale = f"observation: step {self.n} of a long episode " + "and more words " * 8
        return super().act(obs)


@pytest.mark.parametrize("envs", [1, 3], ids=["serial", "lockstep"])
def test_first_success_and_failure_gifs_with_captions(monkeypatch, tmp_path, envs):
    import test_evaluate as fake

    monkeypatch.setitem(ev.BACKENDS, "fake", "test_evaluate")
    cfg = EvaluateConfig(backend="fake", tasks=["good"], episodes_per_task=4, image_size=8, progress=False,
                         envs_per_worker=envs, splits=["in_distribution", "variant"], variant_base_seed=500)
    df = ev.evaluate(Narrator, cfg, tmp_path)
    assert df.success.tolist() == [True, False, True, False, False, True, False, True]
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert names == [f"good_{s}_{o}.gif" for s in ("in_distribution", "variant") for o in ("failure", "success")]
    success = _frames(tmp_path / "videos" / "good_in_distribution_success.gif")
    failure = _frames(tmp_path / "videos" / "good_in_distribution_failure.gif")
    assert len(success) == 3 + 1 and len(failure) == fake.FakeEnv.max_steps + 1
    w = success[0].shape[1]
    assert w >= 192
    green = success[0][w:][..., 1].astype(int) - success[0][w:][..., 0]
    red = failure[0][w:][..., 0].astype(int) - failure[0][w:][..., 1]
    assert (green > 60).sum() > 20 and (red > 60).sum() > 20  # the outcome line in its colour
    # a re-run (resume, nothing to do) and a second evaluation of more episodes keep the first GIFs
    before = (tmp_path / "videos" / "good_in_distribution_success.gif").read_bytes()
    ev.evaluate(Narrator, dataclasses.replace(cfg, episodes_per_task=6), tmp_path)
    assert (tmp_path / "videos" / "good_in_distribution_success.gif").read_bytes() == before
    assert len(list((tmp_path / "videos").iterdir())) == 4


def test_caption_lines_wrap_and_cut():
    lines = caption_lines(3, 12, "failure", "word " * 200, width=30)
    assert lines[0] == "step 3/12  failure" and len(lines) == 5
    assert all(len(line) <= 30 for line in lines[1:]) and lines[-1].endswith("...")
    assert caption_lines(0, 5, "success", "", width=30) == ["step 0/5  success"]


def test_gif_needs_frames(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        save_episode_gif([], [], tmp_path / "x.gif", outcome="success")
    path = save_episode_gif([np.zeros((8, 8, 3), np.uint8)] * 2, ["a", "b"], tmp_path / "y.gif", outcome="success",
                            min_size=64)
    assert Image.open(path).n_frames == 2 and Image.open(path).size[0] == 64
    assert not functools.reduce(lambda a, b: a or b.suffix == ".tmp", tmp_path.iterdir(), False)


def _save_many(path, n):
    frames = [np.full((16, 16, 3), k, np.uint8) for k in range(3)]
    for _ in range(n):
        save_episode_gif(frames, ["a rationale"] * 3, path, outcome="failure")
    return True


def test_two_workers_writing_the_same_gif_at_once_both_succeed(tmp_path):
    """Two evaluation workers can end a failure of the same task and split in the same tick (lockstep slots decode
    in phase): each writes its own temporary file, the last rename wins, neither fails."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    path = tmp_path / "videos" / "lift_in_distribution_failure.gif"
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        done = [pool.submit(_save_many, path, 60) for _ in range(2)]
        assert all(f.result(timeout=120) for f in done)
    assert Image.open(path).n_frames == 3
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
