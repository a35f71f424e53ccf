"""STAND-IN for SpatialVLA's remote-code model (``modeling_spatialvla.py`` of IPEC-COMMUNITY/spatialvla-4b-224-pt,
source: https://github.com/SpatialVLA/SpatialVLA/blob/main/model/modeling_spatialvla.py).

The tests cannot download the 4B weights, so they load this tiny model the way the real one is loaded
(``AutoModel.from_pretrained(path, trust_remote_code=True)``). It keeps what the project's adapter relies on, with the
original's class names, module names and method signatures: a SigLIP ``vision_tower``, a ``multi_modal_projector``, a
Gemma 2 ``language_model`` (``language_model.model.layers``, ``language_model.lm_head`` tied to the token
embeddings), the shared ``spatial_embed_tokens`` that replace the input embeddings of the action tokens,
``_update_causal_mask`` (prefix-LM mask when ``token_type_ids`` and ``labels`` are given, else a bidirectional
prompt), ``forward(..., intrinsic, token_type_ids, labels, ...)``, ``predict_action(model_inputs)`` (greedy, stops at
EOS or 256 tokens) and the ``from_pretrained`` hook that copies the spatial embeddings into the token embeddings.
Left out: the ZoeDepth depth model and the ego-3D position encoding (``use_vision_zoe`` must be False), flash
attention, and transformers 4.x cache classes (the loop in ``predict_action`` recomputes the sequence; the
original calls ``generate`` with a HybridCache), torchvision (normalisation written out). ``predict_action`` casts to the model's dtype, the original to
bfloat16 (a GPU model). ``get_image_features`` convolves the pixels uncast, as ZoeDepth's BEiT embedding does.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import AutoModel, Gemma2ForCausalLM
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_spatialvla import SpatialVLAConfig

SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass
class SpatialVLACausalLMOutputWithPast(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: torch.FloatTensor = None
    past_key_values: Optional[object] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    image_hidden_states: Optional[torch.FloatTensor] = None


class SpatialVLAMultiModalProjector(nn.Module):
    def __init__(self, config: SpatialVLAConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.vision_config.projection_dim, bias=True)

    def forward(self, image_features):
        return self.linear(image_features)


class SpatialVLAPreTrainedModel(PreTrainedModel):
    config_class = SpatialVLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SpatialVLAMultiModalProjector"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.text_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)


class SpatialVLAForConditionalGeneration(SpatialVLAPreTrainedModel):
    def __init__(self, config: SpatialVLAConfig, vision_model=None, vision_zoe_model=None, projector_model=None,
                 language_model=None):
        super().__init__(config)
        if config.use_vision_zoe:
            raise ValueError("the SpatialVLA stand-in has no ZoeDepth model: set use_vision_zoe false")
        self.vision_tower = vision_model or AutoModel.from_config(config=config.vision_config)
        self.multi_modal_projector = projector_model or SpatialVLAMultiModalProjector(config)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = language_model or Gemma2ForCausalLM(config=config.text_config)
        self._tied_weights_keys = {f"language_model.{k}": f"language_model.{v}"
                                   for k, v in (self.language_model._tied_weights_keys or {}).items()}
        if config.use_spatial_token:
            self.spatial_embed_tokens = nn.Embedding(config.spatial_token_num, config.text_config.hidden_size)
        else:
            self.spatial_embed_tokens = None
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else -1
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        model_embeds = self.language_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.config.text_config.vocab_size = self.vocab_size = self.config._vocab_size = model_embeds.weight.shape[0]
        return model_embeds

    def _update_causal_mask(self, attention_mask, token_type_ids, past_key_values, cache_position, input_ids=None,
                            inputs_embeds=None, is_training: bool = False):
        """The original's mask: with ``is_training`` (token_type_ids and labels given) the prefix (type 0) is seen by
        every token and the targets (type 1) causally; otherwise the whole first pass attends bidirectionally."""
        min_dtype = torch.finfo(self.dtype).min
        lead = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        sequence_length = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        target_length = (attention_mask.shape[-1] if isinstance(attention_mask, torch.Tensor)
                         else cache_position[0] + sequence_length + 1)
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        causal_mask = torch.full((sequence_length, target_length), fill_value=min_dtype, dtype=self.dtype,
                                 device=cache_position.device)
        if sequence_length != 1:
            if is_training:
                causal_mask = torch.triu(causal_mask, diagonal=1)
            else:
                causal_mask[:, :sequence_length] = 0.0
        causal_mask *= torch.arange(target_length, device=cache_position.device) > cache_position.reshape(-1, 1)
        causal_mask = causal_mask[None, None, :, :].expand(lead, 1, -1, -1)
        if attention_mask is not None:
            causal_mask = causal_mask.clone()
            n = attention_mask.shape[-1]
            padding_mask = (causal_mask[:, :, :, :n] + attention_mask[:, None, None, :].to(causal_mask.device)) == 0
            causal_mask[:, :, :, :n] = causal_mask[:, :, :, :n].masked_fill(padding_mask, min_dtype)
            if is_training:
                causal_mask[:, :, :, :n] = causal_mask[:, :, :, :n].masked_fill(
                    token_type_ids[:, None, None, :].to(causal_mask.device) == 0, 0)
        return causal_mask

    def get_image_features(self, pixel_values: torch.FloatTensor, intrinsic: torch.FloatTensor):
        # The original also feeds the pixels to ZoeDepth, whose BEiT patch convolution (transformers 4.47.1) takes
        # them as they come, without casting to its weights' dtype: a bf16 model given float32 pixels stops there.
        # The stand-in has no depth model, so it runs its SigLIP patch convolution the same way (result unused).
        tower = self.vision_tower
        patch = getattr(tower, "vision_model", tower).embeddings.patch_embedding  # transformers 4.x nests it
        nn.functional.conv2d(pixel_values, patch.weight, patch.bias, stride=patch.stride)
        mean = torch.tensor(SIGLIP_MEAN, device=pixel_values.device, dtype=pixel_values.dtype)[:, None, None]
        std = torch.tensor(SIGLIP_STD, device=pixel_values.device, dtype=pixel_values.dtype)[:, None, None]
        siglip_pixel_values = (pixel_values - mean) / std  # the original: torchvision's TF.normalize
        image_outputs = self.vision_tower(siglip_pixel_values)
        image_features = self.multi_modal_projector(image_outputs.last_hidden_state)
        return image_features / (self.config.text_config.hidden_size ** 0.5)

    def forward(self, input_ids=None, pixel_values=None, actions=None, intrinsic=None, attention_mask=None,
                position_ids=None, past_key_values=None, token_type_ids=None, cache_position=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, num_logits_to_keep: int = 0):
        is_training = token_type_ids is not None and labels is not None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids).clone()
        if self.config.use_spatial_token:
            begin = self.config.action_token_begin_idx
            selected = (input_ids >= begin) & (input_ids < begin + self.config.spatial_token_num)
            inputs_embeds[selected] = inputs_embeds[selected] * 0.0 + self.spatial_embed_tokens(input_ids[selected] - begin)
        if cache_position is None:
            cache_position = torch.arange(0, inputs_embeds.shape[1], device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0) + 1  # PaliGemma positions are 1-indexed
        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, intrinsic)
            special_image_mask = (input_ids == self.config.image_token_index).unsqueeze(-1).expand_as(inputs_embeds)
            if inputs_embeds[special_image_mask].numel() != image_features.numel():
                raise ValueError("Number of images does not match number of special image tokens in the input text.")
            inputs_embeds = inputs_embeds.masked_scatter(special_image_mask,
                                                         image_features.to(inputs_embeds.device, inputs_embeds.dtype))
        causal_mask = self._update_causal_mask(attention_mask, token_type_ids, past_key_values, cache_position,
                                               input_ids, inputs_embeds, is_training)
        outputs = self.language_model(attention_mask=causal_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                                      use_cache=False, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, logits_to_keep=num_logits_to_keep)
        logits = outputs.logits
        loss = None
        if labels is not None:
            shift_logits, shift_labels = logits.float()[..., :-1, :], labels[..., 1:]
            if attention_mask is not None:
                keep = attention_mask[:, -shift_logits.shape[1]:] != 0
                shift_logits, shift_labels = shift_logits[keep], shift_labels[keep]
            loss = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1))
        return SpatialVLACausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                                attentions=outputs.attentions, image_hidden_states=image_features)

    @torch.no_grad()
    def predict_action(self, model_inputs) -> torch.Tensor:
        """Greedy decoding until EOS (at most 256 new tokens); returns the generated ids [B, new]."""
        model_inputs = model_inputs.to(self.dtype).to(self.device)
        ids = model_inputs["input_ids"]
        input_len, eos = ids.shape[-1], self.config.text_config.eos_token_id
        for _ in range(256):
            types = torch.zeros_like(ids)
            types[:, input_len:] = 1  # the prompt's first pass is bidirectional, generated tokens causal
            out = self(input_ids=ids, pixel_values=model_inputs["pixel_values"], intrinsic=model_inputs.get("intrinsic"),
                       attention_mask=torch.ones_like(ids), token_type_ids=types, labels=ids)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if (nxt == eos).all():
                break
        return ids[:, input_len:]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if model.config.use_spatial_token:
            emb = model.language_model.model.embed_tokens.weight
            if emb.dtype.is_floating_point:
                emb.data[-model.config.spatial_token_num:] = model.spatial_embed_tokens.weight.data.to(emb.dtype)
        return model
