"""Numerics do not depend on the machine's core count: the thread count torch computes with comes from the config.

A training step's gradients differ in their last bits between 1 and 2 intra-op threads (reductions are split
differently), so a run whose thread count followed the core count would give other weights, and other episode
outcomes, on another machine. The embedded presets therefore pin ``threads: 1`` for every training stage. These
tests pre-train the same micro base in fresh processes whose environment asks for other thread counts
(OMP_NUM_THREADS, MKL_NUM_THREADS) and compare the saved weights byte for byte; the control shows that the thread
count torch uses does change them, so the comparison can fail.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refinevla.config import resolve

ROOT = Path(__file__).parent.parent
SCRIPT = """
import hashlib, sys
sys.path.insert(0, 'tests')
from conftest import synthetic_dataset
from refinevla import train
from refinevla.model import ModelConfig
cfg = train.TrainConfig(arm='pretrain', use_rationale=False, steps=12, batch_size=8, lr=3e-3, warmup_steps=3,
                        log_every=100, checkpoint_every=1000, threads=int(sys.argv[2]))
out = train.pretrain_base(synthetic_dataset(), ModelConfig(size='micro'), cfg, sys.argv[1])
print(hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest())
"""


def pretrain_digest(tmp_path, name, threads, env_threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(env_threads), MKL_NUM_THREADS=str(env_threads))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / name), str(threads)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-1]


@pytest.fixture(scope="module")
def one_thread(tmp_path_factory):
    return pretrain_digest(tmp_path_factory.mktemp("det"), "a", threads=1, env_threads=1)


def test_the_same_config_gives_the_same_weights_whatever_the_environment_asks(one_thread, tmp_path):
    assert pretrain_digest(tmp_path, "b", threads=1, env_threads=2) == one_thread


def test_control_the_thread_count_torch_uses_changes_the_weights(one_thread, tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores")
    assert pretrain_digest(tmp_path, "c", threads=2, env_threads=2) != one_thread


def test_two_threads_are_as_reproducible_as_one(tmp_path):
    """The count torch computes with, not the cores or the environment, sets the reduction order: two pinned threads
    give the same weights in every run (about twice as fast on 2 idle cores: benchmarks/results/threads.json)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores")
    first = pretrain_digest(tmp_path, "d", threads=2, env_threads=1)
    assert pretrain_digest(tmp_path, "e", threads=2, env_threads=2) == first


@pytest.mark.parametrize("preset", ["default", "study", "base", "vla"])
def test_embedded_presets_pin_the_thread_count_of_every_training_stage(preset):
    cfg = resolve(preset)
    # a preset that loads the released base trains only the fine-tunes; the base preset trains both stages of it,
    # the vla preset its stage (b) again
    stages = (["vlm", "pretrain"] if preset == "base" else ["pretrain"] if preset == "vla" else
              ["baseline", "refinevla"] + ([] if cfg.model.checkpoint else ["pretrain"]))
    assert [getattr(cfg, s).threads for s in stages] == [1] * len(stages), stages
