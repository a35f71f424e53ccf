"""STAND-IN for SpatialVLA's remote-code processor (``processing_spatialvla.py`` of IPEC-COMMUNITY/spatialvla-4b-224-pt,
source: https://github.com/SpatialVLA/SpatialVLA/blob/main/model/processing_spatialvla.py).

Same class name, constructor arguments (``statistics``, ``bin_policy``, ``intrinsic_config``, ``action_config``,
``action_chunk_size``, ...), call signature ``processor(images, text, unnorm_key, suffix_actions)`` and
``decode_actions(generation_outputs, unnorm_key)`` (copied logic: the first ``3 * action_chunk_size`` generated ids
-> the spatial action tokenizer -> BOUNDS_Q99 un-normalisation with the dataset's ``q01``/``q99`` and ``mask``).
Prompt layout as the original's (PaliGemma's): ``<image> x N, <bos>, prompt, "\n"``, the suffix (action tokens,
``<eos>``) as token type 1 with labels. Written for transformers 5 (the original imports PaliGemma helpers that
transformers 5 removed); the image processor and tokenizer are loaded by the Auto classes. Tests only.
"""
from typing import Dict, Optional

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .action_tokenizer import SpatialActionTokenizer

IMAGE_TOKEN = "<image>"


class SpatialVLAProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, statistics: Optional[dict] = None,
                 bin_policy=None, intrinsic_config=None, action_config=None, num_obs_steps=1, obs_delta=1,
                 action_chunk_size=1, min_sigma=0.0, **kwargs):
        if image_processor is None or tokenizer is None:
            raise ValueError("You need to specify an `image_processor` and a `tokenizer`.")
        self.image_seq_length = image_processor.image_seq_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.statistics = statistics if statistics else {}
        self.bin_policy, self.min_sigma = bin_policy, min_sigma
        self.intrinsic_config, self.action_config = intrinsic_config, action_config
        self.num_obs_steps, self.obs_delta, self.action_chunk_size = num_obs_steps, obs_delta, action_chunk_size
        height, width = image_processor.size["height"], image_processor.size["width"]
        self.dataset_intrinsics = {}
        for k, v in (intrinsic_config or {}).items():
            K = torch.tensor(v["intrinsic"]).float()
            K[:2] *= torch.tensor([width / v["width"], height / v["height"]])[:, None]
            self.dataset_intrinsics[k] = K
        self.action_tokenizer = SpatialActionTokenizer(tokenizer=tokenizer, num_bins=action_config["num_bins"],
                                                       bin_policy=bin_policy,
                                                       use_spherical=action_config["use_spherical"],
                                                       min_sigma=min_sigma)

    def __call__(self, images=None, text=None, unnorm_key: Optional[str] = None,
                 suffix_actions: Optional[np.ndarray] = None, **kwargs) -> BatchFeature:
        suffix = kwargs.pop("suffix", None)
        if suffix_actions is not None:
            suffix = "".join(self.action_tokenizer(suffix_actions).flatten())
        if images is None:
            raise ValueError("`images` are expected as arguments to a `PaliGemmaProcessor` instance.")
        text = [text] if isinstance(text, str) else list(text or [""])
        images = images if isinstance(images, (list, tuple)) else [images]
        do_normalize = kwargs.pop("do_normalize", None)
        pixel_values = self.image_processor(images, return_tensors="pt", do_normalize=do_normalize)["pixel_values"]
        tok = self.tokenizer
        rows, types = [], []
        for prompt in text:
            ids = ([self.image_token_id] * self.image_seq_length + [tok.bos_token_id]
                   + tok(prompt + "\n", add_special_tokens=False)["input_ids"])
            tt = [0] * len(ids)
            if suffix is not None:
                sfx = tok(suffix, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids, tt = ids + sfx, tt + [1] * len(sfx)
            rows.append(ids)
            types.append(tt)
        input_ids = torch.tensor(rows)
        data = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
                "intrinsic": self.dataset_intrinsics.get(unnorm_key, self.dataset_intrinsics.get("default"))}
        if suffix is not None:
            token_type_ids = torch.tensor(types)
            data.update(token_type_ids=token_type_ids, labels=input_ids.masked_fill(token_type_ids == 0, -100))
        return BatchFeature(data=data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def decode_actions(self, generation_outputs: torch.Tensor, unnorm_key: Optional[str] = None) -> Dict[str, np.ndarray]:
        action_token_num = 3  # translation + rotation + gripper
        n = action_token_num * self.action_chunk_size
        ids = generation_outputs[0, :n].detach().cpu().long().numpy()
        if ids.shape[0] < n:  # pad with zeros, as the original
            ids = np.concatenate([ids, np.zeros(n - ids.shape[0], dtype=np.int64)])
        ids = ids.reshape(-1, action_token_num)
        normalized_action_chunks = self.action_tokenizer.decode_token_ids_to_actions(ids)
        if unnorm_key is None:
            unnorm_key = next(iter(self.statistics.keys()))
        stats = self.statistics[unnorm_key]["action"]
        action_dim = len(stats["q01"])
        mask = np.array(stats.get("mask", np.ones(action_dim)), dtype=bool)
        high, low = np.array(stats["q99"]), np.array(stats["q01"])
        actions = np.stack([np.where(mask, 0.5 * (a + 1) * (high - low) + low, a) for a in normalized_action_chunks])
        return {"actions": actions, "action_ids": ids}
