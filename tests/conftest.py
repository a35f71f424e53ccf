"""Shared fixtures. Run the suite with `make test` (or `.venv/bin/pytest -q`)."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest


def synthetic_rows(n_episodes=4, steps=6, size=32, seed=0, with_rationale=True):
    """Rows in the project's schema whose action is a function of the image (a learnable toy problem).

    A stand-in for demonstrations in unit tests of tokenisation and training; the data stage itself is
    tested against real robosuite in test_data.py.
    """
    import json

    rng = np.random.default_rng(seed)
    rows = []
    for e in range(n_episodes):
        colour = rng.integers(0, 2)
        for t in range(steps):
            img = np.zeros((size, size, 3), np.uint8)
            img[..., colour] = 200
            img[t % size, :, 2] = 255
            action = np.array([0.8 if colour else -0.8, 0.1 * t, -0.5, 0, 0, 0, float(t < steps // 2)], np.float32)
            state = rng.uniform(-1, 1, 8).astype(np.float32)
            row = dict(episode_index=e, step_index=t, task="toy", instruction="pick up the red cube",
                       image=img, state=state, action=action, objects="[]", phase="approach")
            if with_rationale:
                side = "left" if colour else "right"
                row.update(rationale_text=f"observation : the cube is {side} . plan : move {side} then grasp",
                           rationale=json.dumps({}))
            rows.append(row)
    return rows


def synthetic_dataset(**kw):
    import datasets

    rows = synthetic_rows(**kw)
    features = {k: [r[k] for r in rows] for k in rows[0]}
    ds = datasets.Dataset.from_dict(features)
    return ds.cast_column("image", datasets.Image())


@pytest.fixture
def toy_dataset():
    return synthetic_dataset()


# Shared by the tokenizer / model / train / policy tests: a toy dataset, a tokenizer trained on it, its sequences.
MICRO_IMAGE_TOKENS = 16  # the micro size preset: 32 px images, 8 px patches


@pytest.fixture(scope="module")
def ds():
    return synthetic_dataset()


@pytest.fixture(scope="module")
def tok(ds):
    from refinevla import train
    from refinevla.tokens import VLATokenizer

    return VLATokenizer.train_tiny(train._texts_for_tokenizer(ds), *train._stats_from(ds))


@pytest.fixture(scope="module")
def data(ds, tok):
    from refinevla.train import encode_dataset

    return encode_dataset(ds, tok, MICRO_IMAGE_TOKENS, use_rationale=True)


# A test process was once seen under the real-time policy SCHED_FIFO 99 while a browser test spun, starving the
# 2-core machine for an hour. After every test: if any thread of this process left the normal policy, name the
# test that did it and put every thread back under SCHED_OTHER (tests/test_scheduling.py asserts the policy).
_FLIPPED: list[str] = []


def _realtime_threads() -> list[int]:
    import os

    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    out = []
    for tid in tids:
        try:
            if os.sched_getscheduler(tid) in (os.SCHED_FIFO, os.SCHED_RR):
                out.append(tid)
        except OSError:  # the thread ended meanwhile
            pass
    return out


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    import os

    flipped = _realtime_threads()
    if not flipped:
        return
    _FLIPPED.append(item.nodeid)
    for tid in flipped:
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
    pytest.fail(f"{item.nodeid} left {len(flipped)} thread(s) under a real-time policy (reset to SCHED_OTHER)",
                pytrace=False)
