"""Writes the SpatialVLA STAND-IN (tests/standins/spatialvla/) into a folder loadable with trust_remote_code.

The folder's code and config.json are copied; this adds what a hub snapshot also holds: a tokenizer (a word-level
stand-in for Gemma's, with the spatial action tokens ``<ACTION00000>``... as its last ids, as in the real
vocabulary), the image processor's and the processor's configuration (dataset statistics under the real keys
``bridge_orig/1.0.0`` and ``fractal20220817_data/0.1.0``, the bin grid sizes, the camera intrinsics, chunks of 4 actions) and random weights.
"""
import json
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent / "spatialvla"
UNNORM_KEY = "bridge_orig/1.0.0"
FRACTAL_KEY = "fractal20220817_data/0.1.0"  # the Google Robot statistics the real checkpoint also holds
#: stand-in statistics in the real file's layout (BOUNDS_Q99: q01/q99 per dimension; the gripper is not normalised)
STATS = {"action": {"q01": [-0.03, -0.04, -0.03, -0.1, -0.1, -0.2, 0.0], "q99": [0.03, 0.04, 0.03, 0.1, 0.1, 0.2, 1.0],
                    "mask": [True, True, True, True, True, True, False],
                    "mean": [0.0] * 6 + [0.5], "std": [0.01] * 6 + [0.5],
                    "min": [-0.05] * 6 + [0.0], "max": [0.05] * 6 + [1.0]}}
FRACTAL_STATS = {"action": {**STATS["action"], "q01": [-0.2, -0.25, -0.15, -0.3, -0.3, -0.4, 0.0],
                            "q99": [0.2, 0.25, 0.15, 0.3, 0.3, 0.4, 1.0]}}
NUM_BINS = {"translation": {"theta_bins": 4, "phi_bins": 8, "r_bins": 4},
            "rotation": {"roll_bins": 4, "pitch_bins": 4, "yaw_bins": 4}, "gripper": 2}
WORDS = ("pick up the red green blue cube can spoon towel carrot plate put on in place move left right ahead behind "
         "above below of and is a an to then grasp lift open close gripper observation situation spatial plan "
         "reasoning analysis task planning : . , cm from near far robot").split()


def n_action_tokens() -> int:
    t, r = NUM_BINS["translation"], NUM_BINS["rotation"]
    return int(np.prod(list(t.values())) + np.prod(list(r.values())) + NUM_BINS["gripper"])


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                 eos_token="<eos>", additional_special_tokens=["<image>"])
    hf.add_tokens([f"<ACTION{i:05d}>" for i in range(n_action_tokens())], special_tokens=True)
    return hf


def build_spatialvla(out_dir, seed: int = 0) -> Path:
    """The stand-in checkpoint in ``out_dir`` (created); returns its path."""
    import torch
    from transformers import AutoConfig, AutoModel, SiglipImageProcessorPil as SiglipImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in HERE.glob("*.py"):
        shutil.copy(f, out / f.name)
    tok = build_tokenizer()
    tok.save_pretrained(out)
    cfg = json.loads((HERE / "config.json").read_text())
    n_act, vocab = n_action_tokens(), len(tok)
    ids = dict(vocab_size=vocab, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    cfg["text_config"].update(ids)
    cfg.update(vocab_size=vocab, image_token_index=tok.convert_tokens_to_ids("<image>"), spatial_token_num=n_act,
               action_token_begin_idx=vocab - n_act, pad_token_id=tok.pad_token_id)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    size = cfg["vision_config"]["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}, do_normalize=False, image_seq_length=(
        size // cfg["vision_config"]["patch_size"]) ** 2).save_pretrained(out)
    k = [[size * 0.8, 0, size / 2], [0, size * 0.8, size / 2], [0, 0, 1]]
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "SpatialVLAProcessor",
        "auto_map": {"AutoProcessor": "processing_spatialvla.SpatialVLAProcessor"},
        "statistics": {UNNORM_KEY: STATS, FRACTAL_KEY: FRACTAL_STATS}, "bin_policy": None,
        "intrinsic_config": {"default": {"width": size, "height": size, "intrinsic": k}},
        "action_config": {"num_bins": NUM_BINS, "use_spherical": True, "distribution": "uniform"},
        "num_obs_steps": 1, "obs_delta": 1, "action_chunk_size": 4, "min_sigma": 0.0}, indent=1))
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    model = AutoModel.from_config(config, trust_remote_code=True)
    model.save_pretrained(out)
    return out
