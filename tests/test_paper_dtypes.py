"""Paper scale on a GPU runs the bases in bf16 (4-bit or not); the suite runs on a CPU in fp32. These tests put the
SpatialVLA stand-in (tests/standins/) in bf16 and load it as the paper scale does, so a dtype defect shows here.

    .venv/bin/pytest tests/test_paper_dtypes.py -q

What only a GPU run can confirm (the real ZoeDepth / timm modules, bitsandbytes' CUDA kernels) is listed in
book/simplerenv.md.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "standins"))
from build import STATS, build_spatialvla  # noqa: E402

from refinevla import bases  # noqa: E402
from refinevla import model as model_mod  # noqa: E402
from refinevla.bases import RemoteBase, RemotePolicy, RemoteVLA  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return build_spatialvla(tmp_path_factory.mktemp("spatialvla"))


def _bf16_policy(standin, quantization="none"):
    model, processor = bases.load_remote(standin, "spatialvla", quantization)
    if quantization == "none":
        model = model.to(torch.bfloat16)  # as load_remote loads it on a GPU
    vla = RemoteVLA(model, RemoteBase("spatialvla", processor, model.config))
    return RemotePolicy(vla, reasoning=False), model


def _check_actions(actions):
    low, high = np.asarray(STATS["action"]["q01"]), np.asarray(STATS["action"]["q99"])
    assert actions.shape == (4, 7) and actions.dtype == np.float32 and np.isfinite(actions).all()
    assert ((actions[:, :6] >= low[:6] - 1e-6) & (actions[:, :6] <= high[:6] + 1e-6)).all()


def test_bf16_base_acts_through_the_evaluation_path(standin):
    """The decode path (RemotePolicy -> RemoteVLA -> model_inputs) hands a bf16 base bf16 pixels; the stand-in
    convolves them uncast, as ZoeDepth's BEiT embedding does, so float32 pixels would stop it (the control)."""
    policy, model = _bf16_policy(standin)
    assert policy.vla.input_dtype == torch.bfloat16
    image = np.full((32, 32, 3), 90, np.uint8)
    text, actions = policy.predict(image, "pick up the red cube")
    _check_actions(actions)
    base = policy.base
    ids = torch.as_tensor([base.prompt_ids("pick up the red cube")])
    pixels = torch.zeros(1, 3, base.image_size, base.image_size)
    inputs = base.model_inputs(ids, pixels, torch.ones_like(ids), torch.zeros_like(ids), torch.bfloat16)
    assert inputs["pixel_values"].dtype == inputs["intrinsic"].dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="(?i)type|dtype"):  # what the decode path did before: fp32 pixels
        with torch.inference_mode():
            model(**base.model_inputs(ids, pixels, torch.ones_like(ids), torch.zeros_like(ids)))


def test_4bit_load_names_the_dtype_of_the_unquantised_modules(monkeypatch):
    """transformers 4.x's bnb quantizers load every module they do not quantise in float16 unless from_pretrained
    is given a dtype: both loaders pass the compute dtype, under the argument name of the installed version."""
    import transformers

    seen = []

    class Stop(Exception):
        pass

    def record(path, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(model_mod, "compute_dtype", lambda: torch.bfloat16)  # a GPU's
    monkeypatch.setattr(transformers, "__version__", "4.47.1")
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", record)
    monkeypatch.setattr(transformers.PaliGemmaForConditionalGeneration, "from_pretrained", record)
    for load in (lambda: bases.load_remote("x", "spatialvla", "4bit"), lambda: model_mod.load_base("x", "4bit"),
                 lambda: bases.load_remote("x", "spatialvla", "8bit")):
        with pytest.raises(Stop):
            load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the unquantised bf16 load of a GPU
    monkeypatch.setattr(model_mod, "_local_device", lambda: "cpu")
    with pytest.raises(Stop):
        model_mod.load_base("x", "none")
    assert len(seen) == 4
    for kwargs in seen:
        assert kwargs["torch_dtype"] == torch.bfloat16 and "dtype" not in kwargs
    assert seen[0]["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    assert model_mod.dtype_kwarg(torch.bfloat16) == {"dtype": torch.bfloat16}


def test_4bit_bf16_base_loads_without_float16_and_acts(standin, monkeypatch):
    """The 4-bit stand-in loaded as on a GPU (bf16 compute and unquantised modules): no float16 weight anywhere,
    and the evaluation path acts with it."""
    monkeypatch.setattr(model_mod, "compute_dtype", lambda: torch.bfloat16)
    policy, model = _bf16_policy(standin, "4bit")
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    assert torch.float16 not in floats and torch.bfloat16 in floats
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert policy.vla.input_dtype == torch.bfloat16
    _check_actions(policy.predict(np.full((32, 32, 3), 90, np.uint8), "pick up the red cube")[1])
