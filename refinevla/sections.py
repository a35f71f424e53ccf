"""The run config's sections: one dataclass per stage (data, annotate, model, train, evaluate, attention, study).

Each field is declared with ``opt(default, help, ...)`` (refinevla.fields): its help text and allowed values sit
next to it. Nothing here imports torch, transformers or datasets, so resolving and printing a config is instant;
``refinevla.config`` assembles the sections into a ``RunConfig`` and checks the rules that span sections.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from .fields import ConfigError, _bad, check_section, opt, set_field  # noqa: F401
from .schema import (EPISODES_PER_SEED, IN_DISTRIBUTION, MAX_DATA_SEED, RATIONALE_PARTS, SPLITS,  # noqa: F401
                     VARIANT)  # (the split names and data seed bounds, re-exported)


#: Size presets for the tiny model (image tokens = (image_size / patch_size) ** 2).
SIZES = {
    # ~2M parameters: the embedded default (trains in minutes on 2 CPU cores)
    "tiny": dict(image_size=64, patch_size=8, vision_hidden=128, vision_layers=3, vision_heads=4,
                 text_hidden=128, text_layers=4, text_heads=4, kv_heads=1, head_dim=32, mlp=512),
    # the embedded default: "tiny" with 16 px patches (16 image tokens instead of 64: a training step ~2x cheaper on
    # 2 cores); the wrist camera shows the cube large, so the coarser grid still locates it
    "tiny16": dict(image_size=64, patch_size=16, vision_hidden=128, vision_layers=3, vision_heads=4,
                   text_hidden=128, text_layers=4, text_heads=4, kv_heads=1, head_dim=32, mlp=512),
    # ~0.5M parameters: unit tests and the smoke preset
    "micro": dict(image_size=32, patch_size=8, vision_hidden=64, vision_layers=1, vision_heads=2,
                  text_hidden=64, text_layers=2, text_heads=2, kv_heads=1, head_dim=32, mlp=128),
    # >= 50M parameters: the 4-bit memory benchmark
    "bench50m": dict(image_size=64, patch_size=8, vision_hidden=256, vision_layers=2, vision_heads=4,
                     text_hidden=768, text_layers=8, text_heads=8, kv_heads=1, head_dim=96, mlp=3072),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AGGREGATIONS = ("mean_heads", "rollout")
QUERIES = ("action", "rationale")
RESERVED_ARMS = ("baseline", "refinevla", "base", "oracle", "pretrain")


class _Checked:
    """A stage config: ``check_section`` converts and checks its fields, ``validate`` a whole run's. Model, training,
    attention and study configs are also checked when built; data, annotate and evaluate configs are checked by
    their stage (``AnnotateConfig.validate``, ``evaluate.episode_jobs``), so a test can build a bad one."""

    CHECK_ON_INIT: typing.ClassVar[bool] = True

    def __post_init__(self):
        if self.CHECK_ON_INIT:
            check_section(self, type(self).__name__)

    def check(self, prefix: str) -> None:
        """Rules across this section's fields (after each field's type and range are checked)."""


@dataclass
class DataConfig(_Checked):
    """Where the demonstrations come from and how many."""

    CHECK_ON_INIT = False
    source: str = opt("robosuite", "robosuite, or a LeRobot dataset id or local path (paper scale)")
    tasks: list[str] = opt(help="the fine-tuning (target) tasks", factory=lambda: ["pick_cube"])
    episodes_per_task: int = opt(30, "fine-tuning demonstrations per task (robosuite)", ge=1, le=EPISODES_PER_SEED)
    pretrain_mix: dict[str, int] = opt(
        help="the pre-training mixture {task: episodes} (robosuite only; its own seeds, never a fine-tuning one): "
             "the role Open X-Embodiment plays for the paper's base", ge=0, le=EPISODES_PER_SEED,
        factory=lambda: {"pick_cube": 120, "lift": 40, "stack": 20})
    pretrain_variant_share: float = opt(
        0.0, "share of the pre-training mixture's episodes recorded in randomized scenes (textures, lighting, camera "
             "drawn from the episode's own seed, as refinevla.scenes draws the variant split); the fine-tuning set "
             "always shows the default scene", ge=0.0, le=1.0)
    heldout_every: int = opt(10, "every k-th fine-tuning episode is held out of training (held-out loss); 0: none",
                             ge=0)
    image_size: int = opt(64, "camera image side in pixels", ge=8)
    seed: int = opt(0, "data seed: demonstrations use seeds seed*1000 + i, disjoint from the evaluation seeds",
                    ge=0, le=MAX_DATA_SEED)
    workers: int = opt(2, "processes recording demonstrations", ge=1)
    episodes: str = opt("0:10", "LeRobot source: 'a:b' (episodes a..b-1), 'sample:n' (n drawn, seeded), 'i,j,k' "
                                "or 'all' (refinevla.lerobot.select_episodes)")
    stride: int = opt(1, "LeRobot source: keep every k-th frame", ge=1)
    revision: str = opt("", "LeRobot source: the dataset revision (branch, tag or commit); empty: a known "
                        "dataset's pinned v2.x commit (refinevla/lerobot/conventions.py), else main")
    camera: str = opt("", "the policy camera; '' = the source's default (robosuite: the wrist camera)")

    def check(self, prefix):
        if not self.tasks:
            raise ConfigError(f"{prefix}.tasks=[]: name at least one task")
        if not re.fullmatch(r"all|sample:\d+|\d*:\d*|\d+(,\d+)*", self.episodes.strip()):
            raise _bad(f"{prefix}.episodes", self.episodes, "'a:b', 'sample:n', 'i,j,k' or 'all' (n, a, b, i: integers)")


@dataclass
class ModelConfig(_Checked):
    """What model to build or load and how to adapt it."""

    size: str = opt("tiny", "tiny-scale size preset, used when building from scratch", choices=tuple(SIZES))
    checkpoint: str = opt("", "a real checkpoint (local path or hub id) instead of a tiny model")
    quantization: str = opt("4bit", "the fine-tuning base's weights", choices=("none", "8bit", "4bit"))
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: int = opt(32, "LoRA scale numerator (scale = alpha / r)", ge=1)
    lora_dropout: float = opt(0.0, "dropout on the LoRA input", ge=0.0, lt=1.0)
    lora_targets: list[str] = opt(help="linear layers that get LoRA adapters", factory=lambda: list(LORA_TARGETS))
    tune_top_k_layers: int = opt(2, "LoRA on the top K decoder layers only (at most the model's layers)", ge=1)
    attn_implementation: str = opt("eager", "transformers' attention kernel; eager: attention maps can be read out")
    action_chunk: int = opt(1, "actions per decoded frame (SpatialVLA: 4); the tokenizer carries it", ge=1)
    base: str = opt("paligemma", "the base's kind: paligemma (our tiny base or a raw PaliGemma checkpoint), "
                                 "spatialvla or openvla (a pre-trained VLA run by its own remote code, refinevla.bases)",
                    choices=("paligemma", "spatialvla", "openvla"))
    unnorm_key: str = opt("", "remote-code bases: the dataset key of the base's action statistics (SpatialVLA: "
                              "bridge_orig/1.0.0, fractal20220817_data/0.1.0; OpenVLA: bridge_orig); '' = the default")

    def check(self, prefix):
        if self.base != "paligemma" and not self.checkpoint:
            raise _bad(f"{prefix}.checkpoint", self.checkpoint, f"a hub id or local folder of the {self.base} base")
        if self.checkpoint:
            return
        layers = SIZES[self.size]["text_layers"]
        if self.tune_top_k_layers > layers:
            raise _bad(f"{prefix}.tune_top_k_layers", self.tune_top_k_layers,
                       f"1..{layers} (size {self.size!r} has {layers} decoder layers)")


@dataclass
class TrainConfig(_Checked):
    """One training run (the pre-training of the tiny base, or one fine-tune arm)."""

    arm: str = opt("refinevla", "the run's name: pretrain, vlm, baseline, refinevla or a study arm (its folder under train/)")
    use_rationale: bool = opt(True, "put the teacher's rationale in the target sequence")
    lambda_reason: float = opt(0.5, "weight of L_reasoning in L = L_action + lambda * L_reasoning", ge=0.0)
    steps: int = opt(300, "optimizer steps", ge=1)
    batch_size: int = opt(16, "sequences per micro-batch", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    lr: float = opt(1e-3, "peak learning rate (AdamW)", gt=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0.0)
    warmup_steps: int = opt(20, "linear warm-up steps", ge=0)
    min_lr_ratio: float = opt(0.1, "the cosine schedule decays to lr * min_lr_ratio", ge=0.0, le=1.0)
    clip_grad: float = opt(1.0, "gradient norm clipping (0: none)", ge=0.0)
    seed: int = opt(0, "adapter initialisation and data order", ge=0)
    checkpoint_every: int = opt(100, "steps between atomic checkpoints", ge=1)
    log_every: int = opt(10, "steps between metrics lines", ge=1)
    threads: int = opt(0, "CPU threads for torch; 0 = auto: one per core but one", ge=0)
    max_rationale_tokens: int = opt(96, "rationales are cut to this many tokens", ge=1)
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: less memory, slower (paper scale)")
    rationale_position: str = opt("before", "before: reason, then act (ReFineVLA); after: act, then reason "
                                            "(ECoT-Lite)", choices=("before", "after"))
    rationale_dropout: float = opt(0.0, "share of samples trained without their rationale (ECoT-Lite dropout)",
                                   ge=0.0, le=1.0)
    rationale_parts: list[str] = opt(help="rationale parts kept in training (ablation)", choices=RATIONALE_PARTS,
                                     factory=lambda: list(RATIONALE_PARTS))
    eval_every: int = opt(0, "held-out loss every N steps (0: four times per run) and at the end", ge=0)
    eval_batches: int = opt(0, "held-out batches per evaluation (0: the whole held-out set)", ge=0)
    cache_frozen: bool = opt(True, "fine-tunes: compute the frozen part once per frame and train the top K layers on "
                                   "the cached hidden states (exact); false: the whole model at every step")
    augment_shift: int = opt(0, "random shift of each training image by up to this many pixels (edges replicated; "
                                "DrQ/RAD's augmentation against overfitting a small image set); 0: none", ge=0, le=16)

    def check(self, prefix):
        if not self.rationale_parts or len(set(self.rationale_parts)) != len(self.rationale_parts):
            raise _bad(f"{prefix}.rationale_parts", self.rationale_parts,
                       f"one or more distinct parts of {list(RATIONALE_PARTS)}")
        if self.augment_shift and self.cache_frozen and self.arm != "pretrain":
            raise _bad(f"{prefix}.augment_shift", self.augment_shift,
                       f"0 while {prefix}.cache_frozen is true (cached features are computed once per frame, "
                       "unshifted)")

    @property
    def reasons_at_inference(self) -> bool:
        """Whether the trained policy writes its rationale before acting (else it acts directly)."""
        return self.use_rationale and self.rationale_position == "before" and self.rationale_dropout == 0.0


@dataclass
class AnnotateConfig(_Checked):
    """Everything the annotate stage reads. The API key itself never appears here: only the *name* of the
    environment variable that holds it (`api_key_env`), so configs and caches can be shared and committed."""

    CHECK_ON_INIT = False
    teacher: str = opt("privileged", "privileged (offline, from simulator state) or http (an OpenAI-compatible "
                                     "endpoint)", choices=("privileged", "http"))
    base_url: str | None = opt(None, "the OpenAI-compatible endpoint; none = api.openai.com")
    model: str = opt("gpt-4o-mini", "the HTTP teacher's model name")
    api_key_env: str = opt("OPENAI_API_KEY", "name of the environment variable holding the key")
    temperature: float = opt(0.0, "sampling temperature", ge=0.0)
    max_tokens: int = opt(300, "tokens per answer at most (thinking included for reasoning models)", ge=1)
    token_limit_param: str = opt("auto", "the name max_tokens is sent under: auto (max_completion_tokens for OpenAI's "
                                 "gpt-5 and o-series, else max_tokens; switched when the endpoint's 400 asks for the "
                                 "other), max_tokens or max_completion_tokens",
                                 choices=("auto", "max_tokens", "max_completion_tokens"))
    reasoning_effort: str = opt("", "sent as reasoning_effort when set (OpenAI: minimal..high; Gemini: none = no "
                                "thinking, low, medium, high); empty = not sent",
                                choices=("", "none", "minimal", "low", "medium", "high"))
    extra_body: dict = opt(help="extra request fields, added to every request body as they are", factory=dict)
    preflight: int = opt(2, "frames asked one by one before the rest: the run stops at once if the endpoint refuses "
                            "the key, the model or a parameter (0 = off)", ge=0)
    fail_fast_frames: int = opt(4, "stop the run when its first this many frames all fail for the same reason no "
                                   "retry fixes (0 = never)", ge=0)
    concurrency: int = opt(8, "HTTP requests in flight at most", ge=1)
    max_attempts: int = opt(12, "requests per frame at most, retries and repair requests included (a frame that "
                                "meets 8 faults in a row, a bad answer and its failed repair among them, still gets "
                                "its answer)", ge=1)
    timeout_s: float = opt(60.0, "seconds per request", gt=0.0)
    backoff_s: float = opt(1.0, "first retry wait without Retry-After; doubles per attempt", ge=0.0)
    max_wait_s: float = opt(60.0, "cap on any single wait, Retry-After included", ge=0.0)
    stride: int = opt(1, "annotate every k-th frame of a segment; 0 = its first frame only", ge=0)
    segment_by_phase: bool = opt(False, "a segment is an expert phase (else the whole episode)")
    json_schema: bool = opt(True, "the server supports response_format json_schema (else parse + repair)")
    data_root: str = opt("data", "folder the cache path is relative to")
    cache_path: str = opt("cache/teacher.sqlite", "the teacher's answer cache, relative to data_root unless absolute")
    dry_run: bool = opt(False, "print requests, tokens and cost, send nothing")
    prices: dict[str, list[float]] = opt(help="model -> [$ per 1M input, $ per 1M output], overrides", ge=0.0,
                                         factory=dict)
    batch: bool = opt(False, "send the misses as JSONL batch files through the provider's Batch API")
    batch_window: str = opt("24h", "completion window asked of the provider")
    batch_max_requests: int = opt(50000, "lines per batch file (OpenAI's limit)", ge=1)
    batch_max_mb: float = opt(190.0, "MB per batch file (OpenAI's limit is 200)", gt=0.0)
    batch_poll_s: float = opt(60.0, "seconds between batch status checks", ge=0.0)
    batch_timeout_s: float = opt(0.0, "stop waiting for batches after this long (0 = until done); a re-run collects",
                                 ge=0.0)
    batch_discount: float = opt(0.5, "batch price / online price (OpenAI and Gemini: half)", gt=0.0, le=1.0)

    def check(self, prefix):
        for model, price in self.prices.items():
            if len(price) != 2:
                raise _bad(f"{prefix}.prices.{model}", price, "[$ per 1M input tokens, $ per 1M output tokens]")

    def validate(self) -> None:
        """Raise naming the field when a value cannot work."""
        check_section(self, "AnnotateConfig")

    def resolved_cache_path(self) -> Path:
        return Path(self.data_root) / self.cache_path


@dataclass
class EvaluateConfig(_Checked):
    """What to evaluate. In-distribution seeds start at ``base_seed`` (10_000: disjoint from the data stage's
    seeds, which start at 0), variant seeds at ``variant_base_seed``, unless an explicit ``seeds`` list is given;
    every task uses the same seed list."""

    CHECK_ON_INIT = False
    tasks: tuple[str, ...] = opt(help="tasks evaluated", factory=lambda: ["pick_cube"])
    episodes_per_task: int = opt(20, "episodes per task and split", ge=1)
    base_seed: int = opt(10_000, "first in-distribution seed", ge=0)
    seeds: list[int] | None = opt(None, "explicit seeds for every split; overrides base_seed, variant_base_seed and "
                                        "episodes_per_task", ge=0)
    splits: tuple[str, ...] = opt(help="in_distribution and/or variant", choices=SPLITS,
                                  factory=lambda: [IN_DISTRIBUTION])
    variant_base_seed: int = opt(20_000, "first variant-scene seed", ge=0)
    max_steps: int | None = opt(None, "steps per episode at most; none = each task's own horizon", ge=1)
    workers: int = opt(1, "processes running episodes", ge=1)
    envs_per_worker: int = opt(16, "environments each worker steps in lockstep, one batched decode for all "
                                   "(1 = one episode at a time; a robosuite env holds ~0.4 GB)", ge=1)
    image_size: int = opt(64, "camera image side in pixels", ge=8)
    camera: str = opt("robot0_eye_in_hand", "the policy camera (backends whose make_task takes camera)")
    strip_frames: int = opt(4, "frames in the strip of each task's first episode; 0 = no strips", ge=0)
    backend: str = opt("robosuite", "the simulator: a name in refinevla.backends.BACKENDS (robosuite, simpler_env, "
                                    "maniskill3, ...)")
    retry_errors: bool = opt(False, "on resume, run again the episodes that ended in an error")
    progress: bool = opt(True, "a progress bar over episodes")
    reasoning: bool = opt(True, "a VLA trained with rationales writes one before acting (false: acts directly)")
    rationale_frames: int = opt(40, "held-out frames on which a reasoning model's rationale is checked first", ge=0)
    videos: bool = opt(True, "a GIF of the first success and the first failure per task and split (videos/)")
    # SimplerEnv / ManiSkill3 backends (refinevla.backends.simpler.SimplerConfig.from_evaluate)
    simpler_settings: tuple[str, ...] = opt(help="SimplerEnv settings run", choices=("visual_matching",
                                                                                      "variant_aggregation"),
                                            factory=lambda: ["visual_matching", "variant_aggregation"])
    simpler_env_mode: str = opt("scripts", "the evaluation scripts' episode grid, or simpler_env.make's",
                                choices=("scripts", "prepackaged"))
    simpler_sticky_repeat: int = opt(15, "Google Robot sticky gripper: steps a command is held (Octo/OpenVLA 15, "
                                         "SpatialVLA 10)", ge=1)
    simpler_sticky_update: str = opt("every_step", "sticky gripper rule: every_step (Octo/OpenVLA) or on_trigger "
                                                   "(SpatialVLA)", choices=("every_step", "on_trigger"))
    simpler_action_scale: float = opt(1.0, "SimplerEnv's --action-scale", gt=0.0)
    simpler_stop_on_success: bool = opt(False, "end an episode at its first success (SimplerEnv scores the last step)")
    simpler_reuse_env: bool = opt(False, "keep one env across episodes (faster; shifts the env's episode RNG)")
    simpler_seed: int = opt(0, "ManiSkill3 / prepackaged envs: episode i is reset with seed + i", ge=0)
    simpler_asset_dir: str | None = opt(None, "SimplerEnv data folder (real_inpainting/...); none = its own")
    ms3_sim_backend: str = opt("cpu", "ManiSkill3 physics: cpu or gpu", choices=("cpu", "gpu"))
    ms3_render_backend: str = opt("cpu", "ManiSkill3 rendering: cpu (lavapipe) or gpu", choices=("cpu", "gpu"))

    def check(self, prefix):
        from .backends import BACKENDS  # the registry only: no simulator is imported

        if self.backend not in BACKENDS:
            raise _bad(f"{prefix}.backend", self.backend, "one of " + ", ".join(BACKENDS))
        if not self.tasks:
            raise ConfigError(f"{prefix}.tasks=[]: name at least one task")
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise _bad(f"{prefix}.splits", self.splits, f"one or more distinct of {list(SPLITS)}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise _bad(f"{prefix}.seeds", self.seeds, "none, or one or more distinct seeds")

    def seed_list(self, split: str = IN_DISTRIBUTION) -> list[int]:
        """The fixed, ordered seeds every task is evaluated on in ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
        if self.seeds is not None:
            return [int(s) for s in self.seeds]
        base = self.base_seed if split == IN_DISTRIBUTION else self.variant_base_seed
        return [base + i for i in range(self.episodes_per_task)]


@dataclass
class AttentionConfig(_Checked):
    """The attention stage: which frames, which tokens, which layer, which aggregation."""

    frames_per_task: int = opt(16, "frames scored per task", ge=1)
    layer: int = opt(-1, "decoder layer (-1 = last); rollout runs from layer 0 up to this one")
    aggregation: str = opt("mean_heads", "how heads and layers are combined", choices=AGGREGATIONS)
    query: str = opt("action", "which generated tokens' attention is read", choices=QUERIES)
    seed: int = opt(0, "frame choice", ge=0)
    residual: float = opt(0.5, "rollout: weight of the identity added to each layer's attention", ge=0.0, lt=1.0)
    min_mask_pixels: int = opt(1, "fewer visible target pixels = target occluded: score undefined", ge=0)
    overlay_frames: int = opt(4, "frames shown in overlays.png", ge=0)
    reasoning: bool | None = opt(None, "none: reason when the model was trained with rationales (vla.json)")
    max_rationale_tokens: int = opt(64, "rationale tokens generated at most (the teacher writes ~50)", ge=1)
    threads: int = opt(0, "CPU threads for torch (0 = auto)", ge=0)
    open_loop: bool = opt(True, "also score each decoded action against the expert's (frames.csv)")
    grounding_frames: int = opt(200, "held-out frames of the grounding probe of the base and every fine-tune, "
                                     "shown in each scene split of evaluate.splits (grounding.csv; seeds 45_000+, "
                                     "refinevla.grounding); 0: none", ge=0, le=5000)


@dataclass
class GroundingConfig(_Checked):
    """The released tiny base's recipe (``refinevla base``, refinevla.recipe): stage (a) VLM pre-training on
    referring expressions about robosuite frames (``vlm`` section), stage (b) VLA pre-training on the mixture's
    actions with the grounding rows mixed in (``pretrain`` section), then the held-out probe and the base's own
    closed-loop success (``evaluate`` section), all written into one folder."""

    frames: int = opt(4000, "rendered frames of stage (a): initial scenes of the grounding tasks on seeds 40_000+ "
                            "(past 5,000: 60_000+), the arm moved by arm_noise", ge=1, le=15000)
    probe_frames: int = opt(400, "held-out frames of the probe, seeds 45_000+ (never trained on)", ge=1, le=5000)
    tasks: list[str] = opt(help="tasks whose scenes the grounding frames show",
                           factory=lambda: ["pick_cube", "lift", "stack"])
    arm_noise: float = opt(0.1, "std of the Gaussian moves of the arm's joints (radians)", ge=0.0, le=1.0)
    min_pixels: int = opt(4, "an object with fewer visible pixels in a frame is not asked about", ge=0)
    variant_share: float = opt(0.0, "share of the training frames shown in randomized scenes (textures, lighting, "
                                    "camera drawn from the frame's own seed; refinevla.scenes)", ge=0.0, le=1.0)
    demo_every: int = opt(2, "stage (b): grounding rows from every k-th frame of the mixture's demonstrations too "
                             "(0: none)", ge=0)
    state_bins: str = opt("demonstrations", "what the base's state-token bins are fitted on: demonstrations (the "
                          "release), or frames: the demonstrations and the training frames, the end effector's angles "
                          "wrapped around their circular mean (tried: no gain; book/limitations.md)",
                          choices=("demonstrations", "frames"))
    release_dir: str = opt("models/tiny-base", "the released folder (relative: to the repository root)")
    eval_splits: list[str] = opt(help="the splits of the base's own closed-loop success in its model card "
                                      "(evaluate.episodes_per_task each)",
                                 factory=lambda: list(SPLITS))


@dataclass
class StudyConfig(_Checked):
    """Which arms are trained and evaluated, and on how many fine-tuning seeds.

    The main arms (baseline, refinevla) are fine-tuned once per seed in ``seeds``; each extra arm in ``arms`` is the
    ``from`` arm's config with a few keys changed, fine-tuned on the first ``arm_seeds`` seeds. The same seed gives
    every arm the same adapter initialisation and the same data order (train.finetune)."""

    seeds: list[int] = opt(help="fine-tuning seeds of the main arms (baseline, refinevla)", ge=0,
                           factory=lambda: [0, 1])
    arms: dict[str, dict] = opt(
        help="extra arms: name -> {from: baseline | refinevla, key: value, ...}; keys are fields of the training "
             "config or model.<field>", factory=lambda: {
            "dropout": {"from": "refinevla", "rationale_dropout": 0.5},    # ECoT-Lite: reasoning dropout
            "after": {"from": "refinevla", "rationale_position": "after"},  # ECoT-Lite: rationale after the action
        })
    arm_seeds: int = opt(1, "seeds of each extra arm (the first ones of seeds)", ge=0)
    base: bool = opt(True, "evaluate the pre-trained base without fine-tuning (the first row)")
    oracle: bool = opt(True, "evaluate ReFineVLA acting on the teacher's rationale (robosuite only)")
    parallel_finetunes: int = opt(0, "fine-tunes side by side, one process each (0 = auto: one per core on a CPU, "
                                     "one at a time on a GPU)", ge=0)

    def check(self, prefix):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise _bad(f"{prefix}.seeds", self.seeds, "one or more distinct fine-tuning seeds")
        if self.arm_seeds > len(self.seeds):
            raise _bad(f"{prefix}.arm_seeds", self.arm_seeds, f"0..{len(self.seeds)} (the number of study.seeds)")
        for name, spec in self.arms.items():
            if name in RESERVED_ARMS:
                raise _bad(f"{prefix}.arms", name, f"an arm name other than {', '.join(RESERVED_ARMS)}")
            # names and types here; validate() checks the values against the run's own sections (e.g. top-K)
            with_arm_changes(TrainConfig(), ModelConfig(checkpoint="any"), spec, f"{prefix}.arms.{name}")


def with_arm_changes(train: TrainConfig, model: ModelConfig, spec: dict, prefix: str = "study.arms"):
    """Copies of ``(train, model)`` with an arm's changes (``{key: value}``; ``model.<field>`` keys change the model
    config, "from" is skipped), each value converted and checked like an override."""
    if not isinstance(spec, dict):
        raise _bad(prefix, spec, "a mapping {from: baseline | refinevla, key: value, ...}")
    if spec.get("from", "refinevla") not in ("baseline", "refinevla"):
        raise _bad(f"{prefix}.from", spec.get("from"), "baseline or refinevla")
    train, model = dataclasses.replace(train), dataclasses.replace(model)
    for key, value in spec.items():
        if key == "from":
            continue
        target, name = (model, key[len("model."):]) if key.startswith("model.") else (train, key)
        if name not in {f.name for f in fields(target)}:
            raise _bad(prefix, key, f"a key of the training config ({', '.join(f.name for f in fields(train))}) "
                                    "or model.<field>")
        set_field(target, name, value, f"{prefix}.{key}")
    check_section(train, prefix)
    check_section(model, f"{prefix}.model")
    return train, model


