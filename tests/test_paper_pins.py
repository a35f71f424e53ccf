"""The paper-scale environment's pins (envs/paper-spatialvla.txt, make paper-env) against the features the code uses.

    .venv/bin/pytest tests/test_paper_pins.py -q

The paper environment cannot be built here (a second environment with transformers 4.47), so its pins are parsed and
every version they allow is checked against the first release of each feature the code calls.
"""
import inspect
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "envs" / "paper-spatialvla.txt"
#: package -> (feature as written in the code, the first release that has it, the function that uses it)
FEATURES = {"peft": [("exclude_modules=", "0.14.0", "add_lora"),  # peft 0.14.0 release notes: LoraConfig
                     ("trainable_token_indices=", "0.15.0", "add_lora")]}  # peft 0.15.0: trainable tokens
#: released versions around the bounds (minor releases and their last patches)
RELEASES = {"peft": ["0.12.0", "0.13.0", "0.13.2", "0.14.0", "0.15.0", "0.15.2", "0.16.0", "0.17.1"]}


def pins() -> dict[str, Requirement]:
    lines = [ln.split("#")[0].strip() for ln in PINS.read_text().splitlines()]
    return {r.name.lower(): r for r in map(Requirement, filter(None, lines))}


def test_pins_allow_only_versions_with_the_features_the_code_uses():
    from refinevla import model

    required = pins()
    for package, features in FEATURES.items():
        allowed = [v for v in RELEASES[package] if required[package].specifier.contains(v)]
        assert allowed, f"{package}: {required[package]} allows none of {RELEASES[package]}"
        for feature, first, where in features:
            assert feature in inspect.getsource(getattr(model, where)), f"{feature} is no longer used: update FEATURES"
            too_old = [v for v in allowed if Version(v) < Version(first)]
            assert not too_old, f"{PINS.name}: {required[package]} allows {too_old}, but {where} uses {feature} " \
                                f"(peft >= {first})"


def test_pins_keep_the_remote_codes_transformers():
    required = pins()
    assert str(required["transformers"].specifier) == "==4.47.1"  # SpatialVLA's remote code (book/paper.md)
    assert required["peft"].specifier.contains("0.15.0") and not required["peft"].specifier.contains("0.14.0")


def make_variable(name: str) -> str:
    """A variable of the Makefile, its continuation lines joined as make joins them."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.split("=")[0].strip(" ?") == name)
    return " ".join(line.split("=", 1)[1].split())


def test_paper_env_pins_the_python_simplerenv_asks_for():
    """SimplerEnv asks for Python 3.10 or 3.11 (sapien 2.2.2): make paper-env creates its environment with
    PAPER_PYTHON (3.11) and stops, naming the version, on any other."""
    import subprocess
    import sys

    assert make_variable("PAPER_PYTHON") in ("python3.10", "python3.11")
    recipe = (ROOT / "Makefile").read_text().split("\npaper-env:", 1)[1].split("\n\n", 1)[0]
    assert "$(PAPER_PYTHON) -m venv $(PAPER_VENV)" in recipe and "$(PAPER_PYTHON_CHECK)" in recipe
    check = make_variable("PAPER_PYTHON_CHECK")
    for version, ok in (((3, 10, 14), True), ((3, 11, 9), True), ((3, 12, 3), False), ((3, 9, 18), False)):
        code = f"import sys; sys.version_info = {version!r}; exec({check!r})"
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert (run.returncode == 0) == ok, (version, run.stderr)
        assert ok or f"not {version[0]}.{version[1]}: set PAPER_PYTHON" in run.stderr


def test_readme_runs_the_paper_preset_in_the_paper_environment():
    """--preset paper loads SpatialVLA's remote code, which needs transformers 4.47: .venv-paper, not .venv."""
    import re

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Paper scale", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln for ln in block.splitlines() if "--preset paper" in ln]
    assert len(commands) >= 4 and "make paper-env" in block
    for line in commands:
        assert re.match(r"\.venv-paper/bin/(refinevla|accelerate) ", line), line
