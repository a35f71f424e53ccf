"""Runs the adapter (refinevla.bases) on SpatialVLA's REAL remote code at tiny size, random weights, on a CPU.

The real weights cannot be downloaded here, but the real code can be read: this writes a tiny checkpoint around
the files of https://github.com/SpatialVLA/SpatialVLA/tree/main/model (configuration_, modeling_, modeling_gemma2,
processing_spatialvla.py, action_tokenizer.py) and checks, under the transformers 4.x that code needs:
loading with trust_remote_code (4-bit where CUDA is), our targets = its processor's own training targets, a fine-tune step
(top-K LoRA + head rows, gradient checkpointing, L_action and L_reasoning), a 4x7 un-normalised chunk from our decoder, and its own
predict_action + decode_actions. Not a pytest test (it needs a second transformers); run it by hand:

    pip install --target /tmp/tf447 --no-deps transformers==4.47.1 tokenizers==0.21.0 huggingface_hub==0.27.1
    PYTHONPATH=/tmp/tf447 .venv/bin/python tests/standins/check_real_spatialvla.py <SpatialVLA checkout>/model

torchvision, which the real code imports for one ``normalize`` call, may be replaced by a shim on PYTHONPATH.
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[2]))
sys.path.insert(0, str(Path(__file__).parent))


def build(src: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast, SiglipImageProcessor
    from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

    from build import STATS, UNNORM_KEY, WORDS

    for name in ("configuration_spatialvla.py", "modeling_spatialvla.py", "modeling_gemma2.py",
                 "processing_spatialvla.py", "action_tokenizer.py"):
        shutil.copy(src / name, out / name)
    action_config = {"num_bins": {"translation": {"theta_bins": 4, "phi_bins": 8, "r_bins": 4},
                                  "rotation": {"roll_bins": 4, "pitch_bins": 4, "yaw_bins": 4}, "gripper": 2},
                     "use_spherical": True}
    n_act = 4 * 8 * 4 + 4 ** 3 + 2
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                 eos_token="<eos>", additional_special_tokens=["<image>"])
    hf.add_tokens(EXTRA_TOKENS)  # Gemma's <loc>/<seg> tokens, which the real processor adds if missing
    hf.add_tokens([f"<ACTION{i:05d}>" for i in range(n_act)], special_tokens=True)
    hf.save_pretrained(out)
    v = len(hf)
    cfg = json.loads((Path(__file__).parent / "spatialvla" / "config.json").read_text())
    cfg["text_config"].update(vocab_size=v, pad_token_id=hf.pad_token_id, bos_token_id=hf.bos_token_id,
                              eos_token_id=hf.eos_token_id)
    cfg["vision_zoe_config"] = {"model_type": "zoedepth"}  # a config only: the depth model is off (use_vision_zoe)
    cfg.update(vocab_size=v, image_token_index=hf.convert_tokens_to_ids("<image>"), spatial_token_num=n_act,
               action_token_begin_idx=v - n_act, pad_token_id=hf.pad_token_id)
    (out / "config.json").write_text(json.dumps(cfg))
    SiglipImageProcessor(size={"height": 32, "width": 32}, do_normalize=False, image_seq_length=16).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "SpatialVLAProcessor", "auto_map": {"AutoProcessor": "processing_spatialvla.SpatialVLAProcessor"},
        "statistics": {UNNORM_KEY: STATS}, "bin_policy": None, "action_config": action_config,
        "intrinsic_config": {"default": {"width": 32, "height": 32, "intrinsic": [[25.6, 0, 16], [0, 25.6, 16], [0, 0, 1]]}},
        "num_obs_steps": 1, "obs_delta": 1, "action_chunk_size": 4, "min_sigma": 0.0}))
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(out, trust_remote_code=True),
                          trust_remote_code=True).save_pretrained(out)
    return out


def main(src: str) -> None:
    import transformers

    from refinevla import bases
    from refinevla.config import ModelConfig, TrainConfig
    from refinevla.model import add_lora, lora_layer_indices
    from refinevla.train import PREFIX, train_loop

    print("transformers", transformers.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(src), Path(tmp))
        # transformers 4.47 refuses bitsandbytes 4-bit on a CPU (its backend check): 4-bit only where CUDA is
        mcfg = ModelConfig(base="spatialvla", checkpoint=str(path), tune_top_k_layers=1,
                           quantization="4bit" if torch.cuda.is_available() else "none",
                           lora_r=4, lora_alpha=8, action_chunk=4)
        rng = np.random.default_rng(0)
        actions = rng.uniform(-0.03, 0.03, (8, 7)).astype(np.float32)
        actions[:, 6] = rng.integers(0, 2, 8)
        model, base = bases.load_for_finetune(path, mcfg, actions)
        print("loaded", type(model).__name__, "4-bit:", getattr(model, "is_loaded_in_4bit", False))
        chunk = np.stack([actions[:4]])[0]
        own = base.processor(images=[np.zeros((32, 32, 3), np.uint8)], text="pick up the red cube",
                             suffix_actions=bases.normalize(chunk, base.stats), return_tensors="pt")
        n = int((own["token_type_ids"][0] == 0).sum())
        assert base.prompt_ids("pick up the red cube") == own["input_ids"][0, :n].tolist(), "prompt differs"
        assert base.action_to_ids(chunk) == own["input_ids"][0, n:-1].tolist(), "action target differs"
        print("targets = the processor's own training targets")
        ds = {"instruction": ["pick up the red cube"] * 8, "image": [np.full((32, 32, 3), 60 * (i % 3), np.uint8)
                                                                     for i in range(8)]}
        chunks = np.stack([np.stack([actions[min(i + j, 7)] for j in range(4)]) for i in range(8)])
        data = base.encode_dataset(ds, True, chunks=chunks, texts=["the cube is left . plan : move left"] * 8)
        ids = torch.as_tensor(data["input_ids"][[0, 0]].copy())  # one row twice, its last target changed in one
        ids[1, int(data["attention_mask"][0].sum()) - 1] = int(base.action_ids[7])
        tt, am = torch.as_tensor(data["token_type_ids"][[0, 0]]), torch.as_tensor(data["attention_mask"][[0, 0]])
        with torch.no_grad():
            logits = bases.RemoteVLA(model, base)(ids, torch.zeros(2, 3, 32, 32), am, tt).logits
        n_valid = int(am[1].sum()) - 1
        assert torch.allclose(logits[0, :n_valid], logits[1, :n_valid], atol=1e-5), "targets are not causal"
        print("targets causal under its prefix-LM mask (labels passed)")
        head = np.unique(np.concatenate([data["input_ids"][data["part"] != PREFIX], base.action_ids]))
        vla = bases.RemoteVLA(add_lora(model, mcfg, trainable_token_ids=head.tolist(), gradient_checkpointing=True),
                              base)  # as the paper preset trains
        assert lora_layer_indices(vla) == [2], lora_layer_indices(vla)
        cfg = TrainConfig(steps=2, batch_size=4, lr=5e-3, warmup_steps=1, log_every=1, threads=1, cache_frozen=False)
        last = train_loop(vla, data, cfg, Path(tmp) / "run")
        print("fine-tune step:", {k: round(v, 4) for k, v in last.items() if k.startswith("l")})
        text, acts = bases.RemotePolicy(vla, reasoning=True, max_rationale_tokens=4).predict(ds["image"][0],
                                                                                             "pick up the red cube")
        assert acts.shape == (4, 7), acts.shape
        print("our decode: chunk", acts.shape, "rationale", repr(text))
        raw, proc = bases.load_remote(path, "spatialvla")
        raw = raw.to(torch.bfloat16)  # predict_action casts its inputs to bfloat16, as on a GPU
        inputs = proc(images=[ds["image"][0]], text="pick up the red cube", unnorm_key="bridge_orig/1.0.0",
                      return_tensors="pt")
        out = raw.predict_action(inputs)
        print("its predict_action + decode_actions:", proc.decode_actions(out, unnorm_key="bridge_orig/1.0.0")["actions"].shape)
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
