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


# ------------------------------------------------------------------------------------------------- validation
import ast  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: (override, the key the error must name) -- hostile values first, then one per kind of rule.
HOSTILE = [
    ({"episodes_per_task": "-1"}, "evaluate.episodes_per_task"),
    ({"tune_top_k_layers": "9"}, "model.tune_top_k_layers"),      # smoke's micro model has 2 decoder layers
    ({"demos_per_task": "-3"}, "data.episodes_per_task"),
    ({"pretrain_steps": "abc"}, "pretrain.steps"),
    ({"workers": "abc"}, "data.workers"),
    ({"tasks": "5"}, "data.tasks"),
    ({"annotate.dry_run": "maybe"}, "annotate.dry_run"),
    ({"lambda_reason": "-0.5"}, "refinevla.lambda_reason"),
    ({"lambda_reason": "nan"}, "refinevla.lambda_reason"),
    ({"lora_r": "1.5"}, "model.lora_r"),
    ({"quantization": "3bit"}, "model.quantization"),
    ({"eval_splits": "in_distribution,sideways"}, "evaluate.splits"),
    ({"evaluate.max_steps": "0"}, "evaluate.max_steps"),
    ({"seeds": "[0, 0]"}, "study.seeds"),
    ({"seeds": "3"}, "study.seeds"),
    ({"study.arm_seeds": "5"}, "study.arm_seeds"),
    ({"study.arms": "{x: {from: refinevla, nope: 1}}"}, "study.arms.x"),
    ({"study.arms": "{x: {from: pretrain}}"}, "study.arms.x.from"),
    ({"study.arms": "{x: {lambda_reason: abc}}"}, "study.arms.x.lambda_reason"),
    ({"study.arms": "{x: {model.tune_top_k_layers: 3}}"}, "study.arms.x.model.tune_top_k_layers"),
    ({"study.arms": "{baseline: {lambda_reason: 1}}"}, "study.arms"),
    ({"seed": "12"}, "data.seed"),                                  # data seeds 0..9: below the evaluation seeds
    ({"evaluate.base_seed": "5"}, "evaluate.base_seed"),            # would evaluate on fine-tuning seeds
    ({"evaluate.seeds": "[30001]"}, "evaluate.seeds"),              # a pre-training seed
    ({"attention.layer": "2"}, "attention.layer"),
    ({"data.episodes": "ten"}, "data.episodes"),
    ({"evaluate.backend": "gazebo"}, "evaluate.backend"),
    ({"data.pretrain_mix": "{pick_cube: 0}"}, "data.pretrain_mix"),
    ({"annotate.prices": "{m: [1]}"}, "annotate.prices.m"),
    ({"annotate.batch_discount": "0"}, "annotate.batch_discount"),
    ({"name": "../elsewhere"}, "name"),
]


@pytest.mark.parametrize("override,key", HOSTILE, ids=[f"{k}={v}" for (o, _) in HOSTILE for k, v in o.items()])
def test_a_hostile_value_is_refused_in_one_line_naming_key_value_and_allowed(override, key):
    with pytest.raises(config.ConfigError) as err:
        config.resolve("smoke", override)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{key}=") and "expected" in message, message
    assert str(list(override.values())[0]).strip("[]{}").split(",")[0].split(":")[0] in message, message


@pytest.mark.parametrize("text,value", [("true", True), ("yes", True), ("1", True), ("TRUE", True),
                                        ("false", False), ("no", False), ("0", False), (True, True), (0, False)])
def test_bools_take_true_false_yes_no_1_0(text, value):
    assert config.resolve("smoke", {"annotate.dry_run": text}).annotate.dry_run is value


@pytest.mark.parametrize("text", ["maybe", "on", "2", "", "none", 2, 0.5])
def test_bools_refuse_anything_else(text):
    with pytest.raises(config.ConfigError, match="annotate.dry_run"):
        config.resolve("smoke", {"annotate.dry_run": text})


def test_values_are_converted_to_the_field_type():
    cfg = config.resolve("smoke", {"workers": "3", "pretrain.lr": "3e-4", "tasks": "[lift, stack]", "seeds": "0,2",
                                   "evaluate.max_steps": "none", "base_url": "null", "lambda_reason": 1})
    assert cfg.data.workers == cfg.evaluate.workers == 3 and cfg.pretrain.lr == pytest.approx(3e-4)
    assert cfg.data.tasks == ["lift", "stack"] and cfg.study.seeds == [0, 2]
    assert cfg.evaluate.max_steps is None and cfg.annotate.base_url is None
    assert isinstance(cfg.refinevla.lambda_reason, float)


def test_cross_field_rules_follow_the_model():
    assert config.resolve("smoke", {"model_size": "tiny", "tune_top_k_layers": 4}).model.tune_top_k_layers == 4
    # a real checkpoint's layer count is not known here: the model stage checks it
    assert config.resolve("smoke", {"checkpoint": "some/vla", "tune_top_k_layers": 9}).model.tune_top_k_layers == 9
    cfg = config.resolve("study")  # every ablation arm of the study preset is valid, top_all included
    assert cfg.study.arms["top_all"]["model.tune_top_k_layers"] == config.SIZES[cfg.model.size]["text_layers"]
    with pytest.raises(config.ConfigError, match="study.arms.top_all.model.tune_top_k_layers=4"):
        config.resolve("study", {"model_size": "micro", "checkpoint": ""})  # built here: its layers are known
    # the simulator seed ranges apply to robosuite only
    assert config.resolve("paper", {"evaluate.base_seed": 0}).evaluate.base_seed == 0


def test_unknown_keys_are_config_errors_and_key_errors():
    with pytest.raises(config.ConfigError) as err:
        config.resolve("smoke", {"no_such_key": 1})
    assert isinstance(err.value, KeyError) and str(err.value).startswith("unknown config key 'no_such_key'")


def test_a_bad_value_stops_the_cli_before_any_stage_deletes_anything(tmp_path):
    """`refinevla evaluate -p episodes_per_task -1` must fail before it deletes a finished evaluation."""
    finished = tmp_path / "run" / "evaluate" / "baseline" / "episodes.jsonl"
    finished.parent.mkdir(parents=True)
    finished.write_text('{"task": "pick_cube", "split": "in_distribution", "seed": 12000}\n')
    out = subprocess.run([sys.executable, "-m", "refinevla.cli", "evaluate", "--preset", "smoke", "--run", "run",
                          "-p", "root", str(tmp_path), "-p", "episodes_per_task", "-1"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and finished.exists() and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith("evaluate.episodes_per_task=-1: expected an integer >= 1")


# ------------------------------------------------------------------------------------------------- presets, help
@pytest.mark.parametrize("preset", ["smoke", "default", "study", "paper"])
def test_config_command_prints_each_preset(preset, capsys):
    from refinevla import cli

    assert cli.main(["config", "--preset", preset]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == config.resolve(preset).to_dict()
    assert config.from_dict(printed).to_dict() == printed


def test_config_command_imports_no_torch_and_answers_at_once():
    """`refinevla config` imports the stage configs without torch, transformers or datasets (it answers at once)."""
    code = ("import sys, time; t = time.perf_counter(); from refinevla import cli; cli.main(['config', '--preset', "
            "'paper']); print('WALL', time.perf_counter() - t); print('HEAVY', sorted(m for m in sys.modules if "
            "m.split('.')[0] in ('torch', 'transformers', 'datasets', 'openai', 'robosuite', 'peft', 'pandas')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    assert float(re.search(r"WALL (\S+)", out.stdout).group(1)) < 5  # ~0.1 s measured; a generous bound


def test_old_modules_still_export_their_configs():
    from refinevla import attention, evaluate, model, train

    assert model.ModelConfig is config.ModelConfig and model.SIZES is config.SIZES
    assert train.TrainConfig is config.TrainConfig and attention.AttentionConfig is config.AttentionConfig
    assert evaluate.EvaluateConfig is config.EvaluateConfig and evaluate.SPLITS == config.SPLITS


def test_describe_keys_covers_every_field_with_help_default_and_allowed_values():
    rows = config.describe_keys()
    cfg = config.RunConfig()
    expected = [f"{s}.{f.name}" for s in config.SECTIONS for f in config.fields(getattr(cfg, s))]
    assert [key for key, _, _ in rows] == expected
    by_key = {key: (default, text) for key, default, text in rows}
    for key, (_, text) in by_key.items():
        assert not text.startswith("["), f"{key} has no help text"
    assert by_key["refinevla.lambda_reason"][0] == 0.5 and "alias: lambda_reason" in by_key["refinevla.lambda_reason"][1]
    assert "one of none, 8bit, 4bit" in by_key["model.quantization"][1]
    smoke = dict((k, d) for k, d, _ in config.describe_keys(["model"], config.resolve("smoke")))
    assert smoke["model.size"] == "micro"


# ------------------------------------------------------------------------------------------------- packaging
#: import name -> distribution name, where they differ
DIST_OF = {"PIL": "pillow", "yaml": "pyyaml", "mani_skill": "mani-skill", "IPython": "ipython"}
#: imported, deliberately not in pyproject.toml: torch is installed by the Makefile (CPU or CUDA build);
#: SimplerEnv is not on PyPI (book/simplerenv.md installs it from git)
NOT_ON_PYPI = {"torch", "simpler_env", "mani_skill2_real2sim"}


def _imported_names(text: str) -> list[str]:
    """Top-level names of the absolute imports in ``text`` (a line scan when it does not parse, e.g. mid-edit)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return re.findall(r"^\s*(?:import|from)\s+(\w+)", text, re.M)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module.split(".")[0])
    return names


def _third_party_imports() -> dict[str, set[str]]:
    sources = {p: p.read_text() for p in (ROOT / "refinevla").rglob("*.py")}
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        sources[nb] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    found = {}
    for path, text in sources.items():
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("%", "!")))
        for name in _imported_names(text):
                if name not in sys.stdlib_module_names and name not in ("refinevla", "__future__"):
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared() -> set[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = _project()
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_every_imported_package_is_declared_in_pyproject():
    from packaging.utils import canonicalize_name

    declared = _declared()
    missing = {name: sorted(paths)[:3] for name, paths in _third_party_imports().items()
               if name not in NOT_ON_PYPI and canonicalize_name(DIST_OF.get(name, name)) not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_constraints_pin_the_declared_dependencies_but_not_torch():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    assert "torch" not in pins and "refinevla" not in pins
    project = _project()
    for text in project["dependencies"]:
        req = Requirement(text)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), (text, pins.get(req.name))
    assert Requirement([r for r in project["dependencies"] if r.startswith("transformers")][0]).specifier.contains(
        "5.24.0") and not Requirement("transformers>=5.24,<6").specifier.contains("5.23.0")
    assert "-c $(CONSTRAINTS)" in (ROOT / "Makefile").read_text()


def test_the_compared_arms_share_their_training_settings():
    """An override of one arm's optimiser setting would make the arms differ in more than their data: refused in
    one line naming the key and the fix; the same value for both, or an extra arm changing it on purpose, is fine."""
    with pytest.raises(config.ConfigError, match=r"refinevla.lr=0.0001: expected the baseline's value, 0.001"):
        config.resolve("default", {"refinevla.lr": "1e-4"})
    with pytest.raises(config.ConfigError, match=r"refinevla.warmup_steps=20: expected the baseline's value, 5"):
        config.resolve("default", {"baseline.warmup_steps": "5"})
    cfg = config.resolve("default", {"refinevla.lr": "1e-4", "baseline.lr": "1e-4"})
    assert cfg.baseline.lr == cfg.refinevla.lr == pytest.approx(1e-4)
    config.resolve("smoke", {"study.arms": {"slow": {"from": "refinevla", "lr": 1e-4}}})


def test_help_prints_the_values_the_default_run_uses():
    """`refinevla evaluate --help` lists each key with the default preset's value (what `make book` uses), and the
    dataclass default beside it only where the preset changes it."""
    from refinevla.cli import keys_help

    text = keys_help(("evaluate", "refinevla"))
    default = config.resolve("default")
    assert f"evaluate.episodes_per_task = {default.evaluate.episodes_per_task}  (without a preset: 20)" in text
    assert f"refinevla.batch_size = {default.refinevla.batch_size}  (without a preset: 16)" in text
    assert "evaluate.envs_per_worker = 16\n" in text  # the preset keeps the dataclass default


def test_a_config_saved_before_the_arm_rename_loads_with_its_arms():
    """Configs written when a training section's name key was ``variant`` (the released models' manifests, older
    run folders) load with it as ``arm``; ``variant`` elsewhere (a split, a share) is untouched."""
    old = config.resolve("default").to_dict()
    for section in ("pretrain", "baseline", "refinevla", "vlm"):
        old[section]["variant"] = old[section].pop("arm")
    cfg = config.from_dict(old)
    assert (cfg.baseline.arm, cfg.refinevla.arm, cfg.vlm.arm) == ("baseline", "refinevla", "vlm")
    assert cfg.to_dict() == config.resolve("default").to_dict()
    with pytest.raises(config.ConfigError, match="variant"):
        config.from_dict({"evaluate": {"variant": 1}})
