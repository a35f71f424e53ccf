"""Checkpoints that survive a corrupt file: the previous one is kept, a truncated one is named and skipped, the
metrics have no repeated step after the resume (refinevla.checkpoints).

    .venv/bin/pytest tests/test_checkpoints.py -q

A micro PaliGemma trained in full (no 4-bit, no LoRA: the checkpoint code does not depend on either; the 4-bit
LoRA resume is tested in tests/test_train.py) on the toy dataset of conftest.py, one CPU thread.
"""
import json

import pytest
import torch

from refinevla import checkpoints
from refinevla.checkpoints import CheckpointError
from refinevla.model import build_tiny_vla
from refinevla.train import TrainConfig, train_loop

torch.set_num_threads(1)
RUN = dict(steps=8, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, log_every=1, threads=1)


def _model(tok):
    return build_tiny_vla("micro", tok.vocab_size, tok.image_id, tok.pad_id, seed=0)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tok, data, tmp_path_factory):
    model = _model(tok)
    train_loop(model, data, TrainConfig(**RUN), tmp_path_factory.mktemp("uninterrupted"))
    return _weights(model)


def test_the_previous_checkpoint_is_kept(tok, data, tmp_path):
    train_loop(_model(tok), data, TrainConfig(**RUN), tmp_path, stop_after=6)
    assert (tmp_path / "ckpt" / "latest").read_text() == "ckpt-0000006"
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("ckpt-*")) == ["ckpt-0000004", "ckpt-0000006"]


@pytest.mark.parametrize("victim", ["trainable.safetensors", "optimizer.pt", "state.json"])
def test_a_truncated_checkpoint_is_named_and_the_previous_one_resumed(tok, data, uninterrupted, tmp_path, capsys,
                                                                      victim):
    train_loop(_model(tok), data, TrainConfig(**RUN), tmp_path, stop_after=7)  # a kill after step 7
    bad = tmp_path / "ckpt" / "ckpt-0000006" / victim
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    resumed = _model(tok)
    capsys.readouterr()
    train_loop(resumed, data, TrainConfig(**RUN), tmp_path)
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(bad) in warning[0] and "ckpt-0000004 (step 4)" in warning[0]
    for name, value in uninterrupted.items():  # steps 5-8 replayed from step 4 give the same model
        assert torch.equal(_weights(resumed)[name], value), name
    assert _steps(tmp_path) == list(range(1, 9))  # no repeated step after the resume (#16.6)


def test_no_readable_checkpoint_is_one_error_naming_the_file_and_the_fix(tok, data, tmp_path):
    train_loop(_model(tok), data, TrainConfig(**RUN), tmp_path, stop_after=4)
    for ckpt in (tmp_path / "ckpt").glob("ckpt-*"):
        (ckpt / "trainable.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError) as error:
        train_loop(_model(tok), data, TrainConfig(**RUN), tmp_path)
    message = str(error.value)
    assert "\n" not in message and "ckpt-0000004/trainable.safetensors" in message
    assert "delete that folder" in message and str(tmp_path / "ckpt") in message


def test_a_pointer_naming_no_checkpoint_falls_back_to_the_newest_one(tok, data, tmp_path, capsys):
    train_loop(_model(tok), data, TrainConfig(**RUN), tmp_path, stop_after=4)
    (tmp_path / "ckpt" / "latest").write_text("ckpt-00")  # cut short
    assert checkpoints.load_checkpoint(tmp_path / "ckpt", _model(tok), torch.optim.AdamW(_model(tok).parameters())) == 4
    assert "names 'ckpt-00'" in capsys.readouterr().out


def test_checkpoint_tmp_names_are_unique_per_process(tmp_path, monkeypatch):
    seen = []
    real = checkpoints.os.replace
    monkeypatch.setattr(checkpoints.os, "replace", lambda a, b: (seen.append(str(a)), real(a, b)))
    checkpoints._atomic_write(tmp_path / "latest", "x")
    assert str(checkpoints.os.getpid()) in seen[0] and (tmp_path / "latest").read_text() == "x"
