"""STAND-IN for SpatialVLA's remote-code configuration (``configuration_spatialvla.py`` of
IPEC-COMMUNITY/spatialvla-4b-224-pt, source: https://github.com/SpatialVLA/SpatialVLA/blob/main/model/configuration_spatialvla.py).

Same class name, ``model_type`` and constructor arguments as the original; written for transformers 5 (the original
imports names transformers 5 removed) and used only by the tests with tiny dimensions. Not the real model.
"""
from transformers import CONFIG_MAPPING, AutoConfig
from transformers.configuration_utils import PretrainedConfig


class SpatialVLAConfig(PretrainedConfig):
    model_type = "spatialvla"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig, "vision_zoe_config": AutoConfig}

    def __init__(self, vision_config=None, text_config=None, ignore_index=-100, image_token_index=256000,
                 vocab_size=257152, projection_dim=2048, hidden_size=2048, vision_zoe_config=None,
                 action_token_begin_idx=None, spatial_token_num=259, use_spatial_token=False, ego3d_patch_reso=4,
                 n_freqs=8, use_vision_zoe=True, **kwargs):
        self._ignore_index = ignore_index
        self.image_token_index = image_token_index
        self._vocab_size = vocab_size
        self.projection_dim = projection_dim
        self.hidden_size = hidden_size
        self.is_encoder_decoder = False
        if isinstance(vision_config, dict):
            vision_config = CONFIG_MAPPING[vision_config.get("model_type", "siglip_vision_model")](
                **{k: v for k, v in vision_config.items() if k != "model_type"})
        self.vision_config = vision_config
        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config.get("model_type", "gemma2")](
                **{k: v for k, v in text_config.items() if k != "model_type"})
        self.text_config = text_config
        if self.vision_config is not None and self.text_config is not None:
            self.text_config.num_image_tokens = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
            self.vision_config.projection_dim = projection_dim
        self.vision_zoe_config = vision_zoe_config  # the stand-in has no depth model (use_vision_zoe must be False)
        self.action_token_begin_idx = action_token_begin_idx
        self.spatial_token_num = spatial_token_num
        self.use_spatial_token = use_spatial_token
        self.ego3d_patch_reso = ego3d_patch_reso
        self.n_freqs = n_freqs
        self.use_vision_zoe = use_vision_zoe
        super().__init__(**kwargs)

    @property
    def ignore_index(self):
        return self._ignore_index
