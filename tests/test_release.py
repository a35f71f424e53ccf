"""The released tiny base and VLA (refinevla.release; models/tiny-base, models/tiny-vla): each folder is the one its
manifest describes, a missing or altered file is named in one line before anything runs, the recipe reproduces the
first steps of the released training bit for bit, and a small version of the recipe (both releases) runs end to end
and resumes after a kill."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refinevla import recipe, release
from refinevla.config import resolve

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / "models" / "tiny-base"
CLI = [sys.executable, "-m", "refinevla.cli"]


def cli_env():
    return dict(os.environ, MUJOCO_GL="egl", PYTHONUNBUFFERED="1")


# ------------------------------------------------------------------------------------------------ the folder
@pytest.mark.parametrize("name", ["tiny-base", "tiny-vla"])
def test_the_committed_release_matches_its_manifest(name):
    RELEASE = REPO / "models" / name
    manifest = release.verify_release(RELEASE)
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json", "vla.json", "README.md"}
    size = sum(p.stat().st_size for p in RELEASE.iterdir())
    assert size < 50e6, f"the release is {size / 1e6:.1f} MB; the project keeps it under 50 MB"
    card = (RELEASE / "README.md").read_text()
    for stage in ("a", "b"):  # the card shows the manifest's probe, not other numbers
        assert f"{manifest['probe'][stage]['side_accuracy']:.3f}" in card
    ok = manifest["closed_loop"]
    assert f"**{ok['successes']}/{ok['episodes']}**" in card


def test_the_default_preset_loads_the_release_and_keys_it_by_digest():
    cfg = resolve("default")
    assert cfg.model.checkpoint == "models/tiny-vla"
    assert release.is_release(cfg.model.checkpoint)
    ident = release.checkpoint_id(cfg.model.checkpoint)
    assert ident.startswith("models/tiny-vla@") and len(ident.split("@")[1]) == 16
    parent = release.verify_release(cfg.model.checkpoint)["parent"]  # made from the committed base, as it is now
    assert parent == release.checkpoint_id(resolve("vla").model.checkpoint) and parent.startswith("models/tiny-base@")
    assert release.checkpoint_id("IPEC-COMMUNITY/spatialvla-4b-224-pt") == "IPEC-COMMUNITY/spatialvla-4b-224-pt"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_release_file_is_named_in_one_line(tmp_path, damage):
    copy = tmp_path / "tiny-base"
    shutil.copytree(RELEASE, copy)
    weights = copy / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "flip":  # same size, one byte changed
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    with pytest.raises(release.ReleaseError) as err:
        release.verify_release(copy)
    message = str(err.value)
    assert "\n" not in message and str(weights) in message
    assert ("missing" if damage == "delete" else "altered") in message and "make base" in message


def test_a_missing_manifest_is_not_a_release(tmp_path):
    copy = tmp_path / "tiny-base"
    shutil.copytree(RELEASE, copy)
    (copy / "manifest.json").unlink()
    assert not release.is_release(str(copy))
    with pytest.raises(release.ReleaseError, match="manifest.json: missing"):
        release.verify_release(copy)


def test_the_command_line_stops_before_any_stage_on_an_altered_release(tmp_path):
    copy = tmp_path / "tiny-base"
    shutil.copytree(RELEASE, copy)
    (copy / "tokenizer.json").write_text("{}")
    run = subprocess.run(CLI + ["train", "--preset", "default", "-p", "model.checkpoint", str(copy),
                                "-p", "root", str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=300, env=cli_env(), cwd=tmp_path)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "tokenizer.json: altered" in last, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.arrow")), \
        "no stage may write before the release is verified"


# ------------------------------------------------------------------------------------------------ the recipe
def test_the_recipe_reproduces_the_first_released_steps_bit_for_bit(tmp_path):
    """Stage (a)'s first logged steps, re-run from the code (tokenizer, model seed, frames rendered from their
    seeds, data order): the same losses to the last bit, on one thread like the release."""
    cfg = resolve("base")
    expected, got = recipe.check_recipe(RELEASE, cfg, tmp_path / "rerun")
    assert len(got) == len(expected) >= 2
    assert got[0] == {**got[0], "step": expected[0]["step"], "loss": expected[0]["loss"]}  # step 10: bit for bit
    for want, have in zip(expected, got):
        # later steps agree to float32 rounding: MuJoCo's EGL renders depend in their last bits on which
        # simulator's GL context is current, and the re-run makes fewer simulators than the release did
        assert have["step"] == want["step"] and have["loss"] == pytest.approx(want["loss"], rel=1e-6), (want, have)


SMALL = ["-p", "model.size", "micro", "-p", "data.image_size", "32", "-p", "evaluate.image_size", "32",
         "-p", "data.pretrain_mix", "{pick_cube: 2, lift: 1}", "-p", "grounding.frames", "12",
         "-p", "grounding.probe_frames", "6", "-p", "grounding.tasks", "[pick_cube, lift]",
         "-p", "vlm.steps", "40", "-p", "vlm.batch_size", "4", "-p", "vlm.checkpoint_every", "5",
         "-p", "vlm.log_every", "5", "-p", "vlm.eval_every", "20", "-p", "vlm.warmup_steps", "2",
         "-p", "pretrain.steps", "6", "-p", "pretrain.batch_size", "4", "-p", "pretrain.checkpoint_every", "3",
         "-p", "pretrain.log_every", "3", "-p", "pretrain.eval_every", "3", "-p", "pretrain.warmup_steps", "1",
         "-p", "grounding.variant_share", "0.5", "-p", "data.pretrain_variant_share", "0.5",
         "-p", "grounding.eval_splits", "[in_distribution, variant]", "-p", "evaluate.splits",
         "[in_distribution, variant]", "-p", "evaluate.variant_base_seed", "22000",
         "-p", "evaluate.episodes_per_task", "1", "-p", "evaluate.max_steps", "8", "-p", "evaluate.workers", "1"]


def test_a_small_recipe_releases_a_base_and_resumes_after_kill(tmp_path):
    """`refinevla base` at micro size, killed (SIGKILL) during stage (a) after a checkpoint, then run again: it
    resumes from the checkpoint (no repeated metric steps), writes a verified release and its card."""
    out = tmp_path / "released"
    args = CLI + ["base", "--preset", "base", "-p", "root", str(tmp_path / "data"), "-p", "grounding.release_dir",
                  str(out)] + SMALL
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(),
                            cwd=tmp_path, start_new_session=True)
    vlm = tmp_path / "data" / "base" / "base" / "vlm"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            metrics = vlm / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2 and any((vlm / "ckpt").glob("*")):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not out.exists(), "the release folder is written last, whole"
    run = subprocess.run(args, capture_output=True, text=True, timeout=900, env=cli_env(), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = release.verify_release(out)
    steps = [json.loads(x)["step"] for x in (vlm / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    assert manifest["probe"]["a"]["n"] > 0 and manifest["closed_loop"]["episodes"] == 1
    assert [r["split"] for r in manifest["closed_loop_splits"]] == ["in_distribution", "variant"]
    assert manifest["probe_variant"]["b"]["n"] > 0  # the held-out probe in variant scenes too
    episodes = sorted(p.name for p in (tmp_path / "data" / "base" / "base" / "demos" / "episodes").glob("*.npz"))
    assert any(p.endswith("_variant.npz") for p in episodes) and any(not p.endswith("_variant.npz") for p in episodes)
    assert "## Grounding probe" in (out / "README.md").read_text()

    # the second part of `make base`: the released VLA continues the base (the vla preset), keyed by its digest
    vla_out = tmp_path / "released-vla"
    cont = CLI + ["base", "--preset", "vla", "-p", "root", str(tmp_path / "data"), "-p", "grounding.release_dir",
                  str(vla_out)] + SMALL + ["-p", "model.checkpoint", str(out)]
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    with open(damaged / "model.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\0" * 8)
    bad = subprocess.run(cont[:-1] + [str(damaged)], capture_output=True, text=True, timeout=300, env=cli_env(),
                         cwd=tmp_path)
    assert bad.returncode != 0 and "model.safetensors" in bad.stderr.strip().splitlines()[-1], bad.stderr[-2000:]
    assert not vla_out.exists() and not (tmp_path / "data" / "vla" / "base").exists()  # stopped before any stage
    run = subprocess.run(cont, capture_output=True, text=True, timeout=900, env=cli_env(), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    vla = release.verify_release(vla_out)
    assert vla["parent"] == release.checkpoint_id(str(out))
    assert (vla_out / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert (vla_out / "model.safetensors").read_bytes() != (out / "model.safetensors").read_bytes()
    assert vla["probe"]["a"]["n"] > 0  # the parent, probed before it is trained further
    assert "continued" in (vla_out / "README.md").read_text()


def test_training_frames_past_the_first_range_take_their_own_seeds_outside_every_other():
    from refinevla import grounding

    seeds = grounding.frame_seeds(12_000)
    assert seeds[:5_000] == list(range(40_000, 45_000)) and seeds[5_000:] == list(range(60_000, 67_000))
    assert grounding.frame_seeds(4_000) == list(range(40_000, 44_000))  # the release's frames, unchanged
    probe = set(grounding.frame_seeds(5_000, probe=True))
    assert not probe & set(seeds) and not set(range(50_000, 52_000)) & set(seeds)  # probe, grounding benchmark
    with pytest.raises(ValueError, match="frames=15001"):
        grounding.frame_seeds(15_001)
    with pytest.raises(ValueError, match="probe_frames=5001"):
        grounding.frame_seeds(5_001, probe=True)


def test_a_card_names_both_seed_ranges_of_its_grounding_frames():
    assert release.train_seed_text({"grounding_train": [40000, 43999]}) == "40000-43999"
    assert release.train_seed_text({"grounding_train": [40000, 44999], "grounding_train_extra": [60000, 66999]}) == \
        "40000-44999, 60000-66999"
