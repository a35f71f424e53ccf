"""Stage keys that cover the code, --force, reuse of finished stages across run folders, stale inputs refused,
validation before deletion (refinevla.pipeline, refinevla.markers, refinevla.cli).

    .venv/bin/pytest tests/test_stage_keys.py -q

The pipeline's own plumbing runs for real; the *bodies* of the stages (recording demonstrations, the teacher,
training, closed-loop episodes, attention maps) are replaced by stand-ins (``StandIns``) that write small files,
because these tests are about which stage runs, what it may delete and what it reuses, on the smoke preset, in a
second; the real stage bodies are run by tests/test_pipeline_smoke.py.
"""
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from refinevla import cli, config, markers, pipeline, stages


class FakeDataset:
    """A stand-in for a datasets.Dataset: the few things the pipeline itself reads from one."""

    def __init__(self, path=""):
        self.path = str(path)

    def __len__(self):
        return 3

    def __getitem__(self, column):
        return ["pick up the red cube"] * 3


class StandIns:
    """Stand-ins for the stage bodies; ``calls`` lists (stage, run folder name, detail) in the order they ran."""

    def __init__(self, monkeypatch):
        from refinevla import attention, data, evaluate, grounding, teacher, train

        self.calls = []
        monkeypatch.setattr(data, "generate_demos", self.demos)
        monkeypatch.setattr(data, "load_source", self.source)
        monkeypatch.setattr(data, "load_dataset_dir", lambda path, required=None: FakeDataset(path))
        monkeypatch.setattr(teacher, "annotate", self.annotate)
        monkeypatch.setattr(train, "pretrain_base", self.pretrain)
        monkeypatch.setattr(train, "finetune", self.finetune)
        monkeypatch.setattr(train, "split_heldout", lambda ds, every: (ds, None))
        monkeypatch.setattr(evaluate, "evaluate", self.evaluate)
        monkeypatch.setattr(pipeline, "_rationale_check", lambda cfg, model_dir, out: None)
        monkeypatch.setattr(attention, "score_models", self.attention)
        monkeypatch.setattr(grounding, "probe_models", self.probe_models)

    def probe_models(self, models, n_frames, *args, **kwargs):  # the attention stage's grounding probe
        assert "base" in models and n_frames > 0
        return pd.DataFrame([dict(model=m, side_accuracy=0.5) for m in models])

    def _log(self, stage, out, detail=""):
        out = Path(out)
        run = out.parts[[p for p in out.parts].index("data") + 1] if "data" in out.parts else out.parent.name
        self.calls.append((stage, run, detail))

    def stages(self, run=None):
        return [(s, d) for s, r, d in self.calls if run is None or r == run]

    def demos(self, dcfg, out, pretrain=False):
        self._log("demos_pretrain", out)
        (Path(out) / "dataset").mkdir(parents=True, exist_ok=True)
        return FakeDataset()

    def source(self, dcfg, out):
        self._log("demos", out)
        (Path(out) / "dataset").mkdir(parents=True, exist_ok=True)
        return FakeDataset()

    def annotate(self, ds, acfg, out):
        self._log("annotate", out)
        (Path(out) / "dataset").mkdir(parents=True, exist_ok=True)
        return FakeDataset()

    def pretrain(self, frames, mcfg, tcfg, out, texts=(), heldout=None):
        self._log("pretrain", out)
        model = Path(out) / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "model.safetensors").write_bytes(os.urandom(markers.LINK_MIN_BYTES + 10))  # big: hard-linked
        return model

    def finetune(self, ds, base, mcfg, tcfg, out, heldout_every=10):
        self._log("finetune", out, f"{tcfg.arm}/{tcfg.seed}")
        model = Path(out) / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "vla.json").write_text(json.dumps(dict(lambda_reason=tcfg.lambda_reason)))
        return model

    def evaluate(self, factory, ecfg, out, pool=None):
        self._log("evaluate", out, Path(out).relative_to(Path(out).parents[1]).as_posix())
        with open(Path(out) / "episodes.jsonl", "w") as fh:
            for split in ecfg.splits:
                for seed in ecfg.seed_list(split):
                    fh.write(json.dumps(dict(task="pick_cube", split=split, seed=seed, success=seed % 2 == 0)) + "\n")

    def attention(self, models, ds, acfg, out):
        self._log("attention", out)
        table = pd.DataFrame([dict(model=m, score=0.5) for m in models])
        Path(out).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(out) / "scores.csv", index=False)
        return table


@pytest.fixture
def stand_ins(monkeypatch):
    return StandIns(monkeypatch)


def smoke(tmp_path, name="smoke", **overrides):
    return config.resolve("smoke", {"root": str(tmp_path / "data"), "name": name, "study.parallel_finetunes": 1,
                                    **overrides})


# ------------------------------------------------------------------------------------------ code in the key
def _package_copy(tmp_path) -> Path:
    copy = tmp_path / "pkg"
    shutil.copytree(markers.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.csv", "*.yaml"))
    return copy


def test_a_stage_key_covers_the_modules_the_stage_imports_and_no_other(tmp_path):
    pkg = _package_copy(tmp_path)
    names = {s: {p.relative_to(pkg).as_posix() for p in markers.code_files(s, pkg)} for s in markers.stage_code()}
    assert {"train.py", "model.py", "tokens.py", "frozen.py"} <= names["train"]
    assert {"evaluate.py", "policy.py"} <= names["evaluate"] and "data.py" in names["data"]
    for stage in names:  # the orchestration hands a stage its config, which the key hashes already
        assert not names[stage] & {"pipeline.py", "markers.py", "cli.py", "config.py", "book.py", "report.py"}
    before = {s: markers.code_hash(s, pkg) for s in markers.stage_code()}
    with open(pkg / "train.py", "a") as fh:
        fh.write("\n# an edit\n")
    assert markers.code_hash("train", pkg) == before["train"]  # a running process keeps the code it started with
    markers._code_hash.cache_clear()
    after = {s: markers.code_hash(s, pkg) for s in markers.stage_code()}
    changed = {s for s in before if before[s] != after[s]}
    assert changed == {s for s in names if "train.py" in names[s]} and "train" in changed and "data" not in changed


def test_editing_the_training_code_reruns_training_and_what_follows_not_the_data(tmp_path, stand_ins, monkeypatch):
    cfg = smoke(tmp_path)
    pipeline.run_all(cfg)
    first = stand_ins.stages()
    assert [s for s, _ in first].count("finetune") == 6 and ("pretrain", "") in first
    stand_ins.calls.clear()
    pipeline.run_all(cfg)
    assert stand_ins.calls == []  # nothing changed: nothing runs
    real = markers.code_hash
    monkeypatch.setattr(markers, "code_hash", lambda stage, *a: "edited" if stage == "train" else real(stage, *a))
    assert markers.pinned_code_hashes()["train"] == "edited"  # what a fine-tune worker process is given
    pipeline.run_all(cfg)
    ran = {s for s, _ in stand_ins.stages()}
    assert ran == {"pretrain", "finetune", "evaluate", "attention"}


# --------------------------------------------------------------------------------------------------- --force
def test_force_reruns_the_named_stage_from_scratch_even_when_its_marker_matches(tmp_path, stand_ins):
    cfg = smoke(tmp_path)
    pipeline.run_all(cfg)
    ckpt = pipeline.train_dir(cfg, "refinevla", 0) / "ckpt" / "ckpt-0000004"
    ckpt.mkdir(parents=True)  # a checkpoint of the same key: a forced run does not resume from it
    stand_ins.calls.clear()
    pipeline.run_train(cfg, force=["finetune"])
    assert [s for s, _ in stand_ins.stages()] == ["finetune"] * 6 and not ckpt.exists()
    stand_ins.calls.clear()
    assert cli.main(["evaluate", "--preset", "smoke", "--run", "smoke", "-p", "root", cfg.root,
                     "-p", "study.parallel_finetunes", "1", "--force", "evaluate"]) == 0
    assert {s for s, _ in stand_ins.stages()} == {"evaluate"} and len(stand_ins.calls) == 8
    stand_ins.calls.clear()
    pipeline.run_all(cfg, force=["all"])
    assert {s for s, _ in stand_ins.stages()} == {"demos_pretrain", "demos", "annotate", "pretrain", "finetune",
                                                 "evaluate", "attention"}
    with pytest.raises(ValueError, match="force"):
        pipeline.run_data(cfg, force=["everything"])


# ----------------------------------------------------------------------------------- reuse across run folders
def test_another_run_folder_reuses_the_unchanged_upstream_stages(tmp_path, stand_ins):
    first = smoke(tmp_path)
    pipeline.run_all(first)
    stand_ins.calls.clear()
    other = smoke(tmp_path, name="lambda025", lambda_reason=0.25)
    pipeline.run_all(other)
    ran = stand_ins.stages("lambda025")
    assert {s for s, _ in ran} == {"finetune", "evaluate", "attention"}
    trained = sorted(d for s, d in ran if s == "finetune")
    assert trained == ["after/0", "dropout/0", "refinevla/0", "refinevla/1"]  # the arms built on refinevla
    evaluated = sorted(d for s, d in ran if s == "evaluate")
    assert evaluated == ["after/seed0", "dropout/seed0", "oracle/seed0", "refinevla/seed0", "refinevla/seed1"]
    # the copies are finished stages of this run folder, the big files hard links to the first run's
    a, b = first.stage_dir("train", "pretrain"), other.stage_dir("train", "pretrain")
    assert pipeline.is_done(b, pipeline._pretrain_key(other))
    assert (b / markers.REUSED).read_text().strip() == str(a)
    assert os.path.samefile(a / "model" / "model.safetensors", b / "model" / "model.safetensors")
    assert not os.path.samefile(a / "config.yaml", b / "config.yaml")
    assert json.loads((other.stage_dir("train", "refinevla", "seed0", "model", "vla.json")).read_text()) == \
        {"lambda_reason": 0.25}
    times = pipeline.stage_times(other)
    assert "train/pretrain (reused)" in set(times["stage"])
    stand_ins.calls.clear()
    pipeline.run_all(other)
    assert stand_ins.calls == []


def test_rerunning_a_copied_stage_never_writes_into_the_run_it_came_from(tmp_path, stand_ins):
    first = smoke(tmp_path)
    pipeline.run_all(first)
    other = smoke(tmp_path, name="other", lambda_reason=0.25)
    pipeline.run_data(other), pipeline.run_annotate(other), pipeline.run_train(other)
    source = first.stage_dir("train", "pretrain", "model", "model.safetensors")
    before = source.read_bytes()
    pipeline.run_pretrain(other, force=["pretrain"])  # writes new random bytes in other/
    assert source.read_bytes() == before
    assert not (other.stage_dir("train", "pretrain") / markers.REUSED).exists()
    assert not os.path.samefile(source, other.stage_dir("train", "pretrain", "model", "model.safetensors"))


def test_a_file_still_linked_elsewhere_is_made_private_before_a_stage_writes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "big.bin").write_bytes(b"x" * 100)
    os.link(a / "big.bin", b / "big.bin")
    pipeline.start_stage(b, "key")
    with open(b / "big.bin", "ab") as fh:
        fh.write(b"appended in place")
    assert (a / "big.bin").read_bytes() == b"x" * 100


# ------------------------------------------------------------------------------- every stage reads its input
def test_evaluate_refuses_a_model_trained_under_another_config_in_one_line(tmp_path, stand_ins, capsys):
    cfg = smoke(tmp_path)
    pipeline.run_all(cfg)
    unit = pipeline.evaluate_dir(cfg, "refinevla", 0)
    marker = pipeline.read_marker(unit)
    assert marker["model_key"] == pipeline.read_marker(pipeline.train_dir(cfg, "refinevla", 0))["hash"]
    assert pipeline.read_marker(cfg.stage_dir("attention"))["model_keys"]["refinevla seed 0"] == marker["model_key"]
    pipeline.run_all(smoke(tmp_path, name="lambda025", lambda_reason=0.25))  # a finished attention stage to reuse
    # a fine-tune with lambda 0.25 written into this run folder (a Papermill run of 03_finetune with -p lambda_reason)
    pipeline.run_finetune(smoke(tmp_path, lambda_reason=0.25), "refinevla", 0)
    episodes = (unit / "episodes.jsonl").read_text()
    with pytest.raises(pipeline.StaleInputError, match=r"refinevla\.lambda_reason: 0\.25 there, 0\.5 now"):
        pipeline.run_evaluate(cfg)
    with pytest.raises(pipeline.StaleInputError, match="attention refinevla seed 0"):
        pipeline.run_attention(cfg)  # not "reused": its key, built on the markers, matches lambda025's attention
    assert (unit / "episodes.jsonl").read_text() == episodes and pipeline.read_marker(unit) == marker
    capsys.readouterr()
    argv = ["evaluate", "--preset", "smoke", "--run", "smoke", "-p", "root", cfg.root,
            "-p", "study.parallel_finetunes", "1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train/refinevla/seed0" in err[0] and "refinevla train --run smoke" in err[0]
    pipeline.run_train(cfg)  # the fix the message names
    assert cli.main(argv) == 0


def test_a_stage_refuses_an_input_that_is_not_finished(tmp_path, stand_ins):
    cfg = smoke(tmp_path)
    with pytest.raises(pipeline.StaleInputError, match=r"annotate: .*demos is not finished; run `refinevla data"):
        pipeline.run_annotate(cfg)
    assert not cfg.stage_dir("annotate").exists()


# -------------------------------------------------------------------------------- validation before deletion
def _finished_run(tmp_path, stand_ins):
    cfg = smoke(tmp_path)
    pipeline.run_all(cfg)
    return cfg, {p: p.read_bytes() for p in Path(cfg.run_dir).rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv, message", [
    (["train", "-p", "tune_top_k_layers", "9"], "model.tune_top_k_layers=9: expected 1..2"),
    (["evaluate", "-p", "episodes_per_task", "-1"], "evaluate.episodes_per_task=-1: expected an integer >= 1"),
    (["all", "-p", "pretrain_steps", "abc"], "pretrain.steps='abc'"),
])
def test_a_bad_value_on_the_command_line_deletes_nothing(tmp_path, stand_ins, capsys, argv, message):
    cfg, files = _finished_run(tmp_path, stand_ins)
    capsys.readouterr()
    assert cli.main(argv + ["--preset", "smoke", "--run", "smoke", "-p", "root", cfg.root]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert {p: p.read_bytes() for p in Path(cfg.run_dir).rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("stage, field, value", [
    ("train", ("model", "tune_top_k_layers"), 9),
    ("evaluate", ("evaluate", "episodes_per_task"), -1),
    ("data", ("data", "episodes_per_task"), -3),
    ("attention", ("attention", "frames_per_task"), 0),
])
def test_every_stage_validates_the_whole_config_before_deleting(tmp_path, stand_ins, stage, field, value):
    """A value set after resolving (a notebook editing cfg) is refused by the stage itself."""
    cfg, files = _finished_run(tmp_path, stand_ins)
    setattr(getattr(cfg, field[0]), field[1], value)
    with pytest.raises(config.ConfigError, match=f"{field[0]}.{field[1]}"):
        pipeline.runner(stages.by_name(stage))(cfg, force=["all"])
    assert {p: p.read_bytes() for p in Path(cfg.run_dir).rglob("*") if p.is_file()} == files


# ---------------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command, key, absent", [("train", "refinevla.lambda_reason", "evaluate.episodes_per_task"),
                                                  ("evaluate", "evaluate.episodes_per_task", "pretrain.steps"),
                                                  ("annotate", "annotate.base_url", "model.size")])
def test_each_command_lists_the_keys_it_reads(capsys, command, key, absent):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert key in out and absent not in out
    described = {k: (d, t) for k, d, t in config.describe_keys(cfg=config.resolve("default"))}
    default, text = described[key]  # the default run's value (the default preset), as ``refinevla config`` prints it
    assert f"{key} = {default!r}" in out and " ".join(text.split()[:4]) in " ".join(out.split())


# ------------------------------------------------------------------------------------ pages and stored configs
def test_a_page_names_its_models_settings_and_says_when_the_stored_run_disagrees(tmp_path, stand_ins):
    from refinevla import book

    cfg = smoke(tmp_path, "lam", **{"refinevla.lambda_reason": 0.1})
    pipeline.run_all(cfg)
    note = book.page_note(cfg)
    assert "**refinevla**: lambda_reason = 0.1, top K = 1, seeds [0, 1]" in note
    assert "**baseline**: no reasoning loss (lambda 0), top K = 1, seeds [0, 1]" in note
    assert "**dropout**: lambda_reason = 0.1, top K = 1, seeds [0]" in note  # an extra arm, on its own seeds
    assert "the base: pre-trained in this run (seed 0, 20 steps)" in note and "**oracle**: the refinevla models of " \
        "seeds [0]" in note
    assert "disagree" not in note
    study = smoke(tmp_path, "lam", **{"refinevla.lambda_reason": 0.1, "study.arms": {
        "lambda_1": {"from": "refinevla", "lambda_reason": 1.0}, "top_2": {"from": "refinevla",
                                                                           "model.tune_top_k_layers": 2}}})
    note = book.models_line(study)  # an arm that changes lambda or top-K is stated with its own
    assert "**lambda_1**: lambda_reason = 1.0, top K = 1, seeds [0]" in note
    assert "**top_2**: lambda_reason = 0.1, top K = 2, seeds [0]" in note
    other = smoke(tmp_path, "lam", **{"refinevla.lambda_reason": 0.25})
    note = book.page_note(other)
    assert "lambda_reason = 0.25" in note and "disagree with the run's stored results" in note
    assert "refinevla.lambda_reason: 0.1 there, 0.25 now" in note
    params = {"lambda_reason": 0.25, "overrides": {"study.parallel_finetunes": 1}}
    with pytest.raises(book.NotebookFailed, match=r"00_overview: .*train/refinevla/seed0 was made under other "
                                                  r"parameters \(refinevla.lambda_reason: 0.1 there, 0.25 now\)"):
        book.refuse_disagreeing("00_overview", "smoke", "lam", params, root=str(tmp_path / "data"))
    book.refuse_disagreeing("00_overview", "smoke", "lam", {"lambda_reason": 0.1, "overrides": params["overrides"]},
                            root=str(tmp_path / "data"))
    # the evaluation's tables hold the run's seeds and arms: a page given fewer (or more) says so, or is refused
    fewer = smoke(tmp_path, "lam", **{"refinevla.lambda_reason": 0.1, "study.seeds": [0]})
    found = book.disagreements(fewer)
    assert found == [  # the attention stage's grounding probe read seed 1's fine-tunes too
        f"{fewer.run_dir}/attention was made under other parameters (study.seeds: [0, 1] there, [0] now)",
        f"{fewer.run_dir}/evaluate/records.csv holds baseline seed 1, refinevla seed 1, which these parameters do not "
        "evaluate (study.seeds, study.arms, study.base or study.oracle differ)"]
    assert "seeds [0]" in book.page_note(fewer) and "records.csv holds baseline seed 1" in book.page_note(fewer)
    more = smoke(tmp_path, "lam", **{"refinevla.lambda_reason": 0.1, "study.arms": {
        "after": {"from": "refinevla", "rationale_position": "after"}, "dropout": {"from": "refinevla",
        "rationale_dropout": 0.5}, "extra": {"from": "refinevla", "rationale_dropout": 0.25}}})
    assert any("records.csv lacks extra seed 0" in f for f in book.disagreements(more))
    with pytest.raises(book.NotebookFailed, match=r"06_results: .*attention was made under other parameters "
                                                  r"\(study.seeds: \[0, 1\] there, \[0\] now\) \(and 1 more\)"):
        book.refuse_disagreeing("06_results", "smoke", "lam", {"lambda_reason": 0.1, "seeds": [0],
                                                               "overrides": params["overrides"]},
                                root=str(tmp_path / "data"))
    # the attention stage made under other parameters is named too
    other_attention = smoke(tmp_path, "lam", **{"refinevla.lambda_reason": 0.1, "attention.frames_per_task": 3})
    assert book.disagreements(other_attention) == [
        f"{other_attention.run_dir}/attention was made under other parameters (attention.frames_per_task: 2 there, "
        "3 now)"]


# ------------------------------------------------------------------------------ a stage is one declaration
def test_a_toy_stage_added_with_one_declaration_is_run_forced_keyed_helped_and_paged(tmp_path, stand_ins, monkeypatch,
                                                                                     capsys):
    """One Stage in refinevla.stages (and its function) is all the pipeline, the command line, the stage keys and
    the book need to know of a new stage."""
    from refinevla import book

    def run_toy(cfg, force=()):
        run = pipeline.stage_run(cfg, "toy", force)
        pipeline.require_input(cfg, "annotate", "toy")
        out = cfg.stage_dir("toy")
        key = markers.stage_key([cfg.study.seeds], [cfg.stage_dir("annotate")], code="toy")
        if run.done(out, key, "toy"):
            return "up to date"
        with run.writing(out, key) as marker:
            stand_ins.calls.append(("toy", cfg.name, ""))
            (out / "toy.txt").write_text("made")
            marker["rows"] = 1
        return "made"

    toy = stages.Stage("toy", "a toy stage that reads the rationales", sections=("study",), code=("stats",),
                       dists=("numpy",), outputs=("toy",), inputs=("annotate",), notebook="07_toy", runner=run_toy)
    monkeypatch.setattr(stages, "STAGES", stages.STAGES + (toy,))

    cfg = smoke(tmp_path)
    pipeline.run_all(cfg)
    assert [s for s, _ in stand_ins.stages()][-2:] == ["attention", "toy"]  # after the declared stages before it
    marker = markers.read_marker(cfg.stage_dir("toy"))
    assert marker["rows"] == 1 and "toy.txt" in str(marker["files"])
    assert (cfg.stage_dir("toy") / "config.yaml").exists()
    stand_ins.calls.clear()
    pipeline.run_all(cfg)
    assert stand_ins.stages() == []  # its key did not change: up to date like every other stage
    assert cli.main(["toy", "--preset", "smoke", "--run", "smoke", "-p", "root", cfg.root, "--force", "toy"]) == 0
    assert stand_ins.stages() == [("toy", "")]
    capsys.readouterr()

    assert "toy" in stages.force_names() and stages.force_names()[-1] == "all"
    assert {p.name for p in markers.code_files("toy")} >= {"stats.py"} and "toy" in markers.pinned_code_hashes()
    with pytest.raises(SystemExit):
        cli.main(["toy", "--help"])
    out = capsys.readouterr().out
    assert "a toy stage that reads the rationales" in out and "study.seeds" in out and "annotate.model" not in out
    assert "07_toy" in book.notebooks() and book.notebooks()["07_toy"].inputs == ("annotate",)
    assert "toy" in book.notebooks()["06_results"].inputs  # the results page reads every stage's folders
    assert book.toc_notebooks()[0] == "00_overview" and "07_toy" in book.toc_notebooks()
    assert stages.sections_upstream("toy") == ("data", "annotate", "study")
