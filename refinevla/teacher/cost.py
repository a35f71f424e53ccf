"""What an HTTP teacher run costs: list prices, image tokens per provider, the dry-run estimate.

Image tokens differ by provider (the estimate uses the frame's real size):
- Gemini: 258 tokens for an image with both sides <= 384 px, else 258 per 768x768 tile
  (https://ai.google.dev/gemini-api/docs/tokens).
- OpenAI, tile models (gpt-4o, gpt-4.1, gpt-5, o1, o3): the image is fitted in 2048x2048, its short side scaled down
  to 768 px, then cut into 512 px tiles: base + per-tile tokens (gpt-4o: 85 + 170 per tile; gpt-4o-mini: 2833 +
  5667, which makes its images cost what gpt-4o's do). Patch models (gpt-4.1-mini/nano, gpt-5-mini/nano, o4-mini):
  32 px patches (at most 1536) times a per-model multiplier. Both from "Calculating costs" in
  https://platform.openai.com/docs/guides/images-vision (detail "high", the upper bound of the default "auto").
- Anything else (a local server): 258, and no price (cost unknown unless AnnotateConfig.prices names one).
"""
from __future__ import annotations

import math

from .cache import AnswerCache
from .request import SYSTEM_PROMPT, jobs, user_text

#: $ per 1M tokens (input, output): list prices as published by the providers (2025; gemini-3.8-flash: its
#: December 2026 price, https://ai.google.dev/gemini-api/docs/pricing); check yours and override with
#: AnnotateConfig.prices. Local servers cost nothing.
PRICES = {"gemini-3.8-flash": (0.75, 3.75),
          "gemini-2.5-flash": (0.30, 2.50), "gemini-2.5-flash-lite": (0.10, 0.40),
          "gemini-2.0-flash": (0.10, 0.40), "gemini-2.0-flash-lite": (0.075, 0.30),
          "gpt-5": (1.25, 10.00), "gpt-5-mini": (0.25, 2.00), "gpt-5-nano": (0.05, 0.40),
          "gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00), "gpt-4.1-mini": (0.40, 1.60),
          "gpt-4.1-nano": (0.10, 0.40)}
OUTPUT_TOKENS = 120  # a typical four-part JSON answer, for the estimate (the upper bound is max_tokens)
GEMINI_IMAGE_TOKENS, GEMINI_TILE = 258, 768
#: OpenAI tile models: name prefix -> (base tokens, tokens per 512 px tile); the longest matching prefix wins.
OPENAI_TILES = {"gpt-4o": (85, 170), "gpt-4o-mini": (2833, 5667), "gpt-4.1": (85, 170), "gpt-4.5": (85, 170),
                "gpt-5": (70, 140), "o1": (75, 150), "o3": (75, 150)}
#: OpenAI patch models: name prefix -> multiplier on the count of 32 px patches.
OPENAI_PATCHES = {"gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46, "gpt-5-mini": 1.62, "gpt-5-nano": 2.46,
                  "o4-mini": 1.72}
MAX_PATCHES = 1536


def longest_prefix(name: str, table: dict):
    hits = [k for k in table if name.startswith(k)]
    return table[max(hits, key=len)] if hits else None


def image_tokens(model: str, height: int, width: int) -> int:
    """Input tokens one image of this size costs with this model (see the module docstring)."""
    name = model.rsplit("/", 1)[-1].lower()
    if "gemini" in name:
        if height <= 384 and width <= 384:
            return GEMINI_IMAGE_TOKENS
        return math.ceil(height / GEMINI_TILE) * math.ceil(width / GEMINI_TILE) * GEMINI_IMAGE_TOKENS
    rule = longest_prefix(name, {**{k: ("tiles", v) for k, v in OPENAI_TILES.items()},
                                 **{k: ("patches", v) for k, v in OPENAI_PATCHES.items()}})
    if rule and rule[0] == "patches":
        n = math.ceil(height / 32) * math.ceil(width / 32)
        if n > MAX_PATCHES:  # scaled down to fit the patch budget
            scale = math.sqrt(MAX_PATCHES / n)
            n = min(MAX_PATCHES, math.ceil(height * scale / 32) * math.ceil(width * scale / 32))
        return math.ceil(n * rule[1])
    if rule:
        (base, per_tile), scale = rule[1], min(1.0, 2048 / max(height, width))
        h, w = height * scale, width * scale
        scale = min(1.0, 768 / min(h, w))
        return base + per_tile * math.ceil(h * scale / 512) * math.ceil(w * scale / 512)
    return GEMINI_IMAGE_TOKENS


def price(cfg) -> tuple[float, float] | None:
    """($ per 1M input, $ per 1M output) for cfg.model ("models/x" and "google/x" match "x"), or None."""
    table = {**PRICES, **{k: tuple(v) for k, v in cfg.prices.items()}}
    return table.get(cfg.model) or table.get(cfg.model.rsplit("/", 1)[-1])


def cost_usd(cfg, input_tokens: int, output_tokens: int) -> float | None:
    """At the online list price, or its batch_discount share when the Batch API is used."""
    p = price(cfg)
    scale = cfg.batch_discount if cfg.batch else 1.0
    return None if p is None else (input_tokens * p[0] + output_tokens * p[1]) / 1e6 * scale


def estimate(demos, keys: list[int], cfg) -> dict:
    """What a run would send (cache hits excluded), its tokens (text ~4 characters per token plus the image's
    tokens for this provider, OUTPUT_TOKENS per answer) and its cost. Sends nothing."""
    cache = AnswerCache(cfg.resolved_cache_path())
    requests, input_tokens, per_image = 0, 0, set()
    try:
        answered = cache.ok_keys()
    finally:
        cache.close()
    for job in jobs(demos, keys, cfg):
        if job.key not in answered:
            requests += 1
            input_tokens += (len(SYSTEM_PROMPT) + len(user_text(job.instruction, job.state, job.action))) // 4
            n = image_tokens(cfg.model, *job.image.shape[:2])
            input_tokens += n
            per_image.add(n)
    output_tokens = requests * OUTPUT_TOKENS
    return {"teacher": "http", "model": cfg.model, "rows": len(demos), "key_frames": len(keys),
            "cached": len(keys) - requests, "requests": requests, "input_tokens": input_tokens,
            "image_tokens_per_frame": sorted(per_image), "output_tokens": output_tokens,
            "cost_usd": cost_usd(cfg, input_tokens, output_tokens),
            "cost_usd_max": cost_usd(cfg, input_tokens, requests * cfg.max_tokens), "price_per_1m": price(cfg),
            "mode": "batch" if cfg.batch else "online",
            "batch_files": -(-requests // cfg.batch_max_requests) if cfg.batch else 0}


def format_estimate(e: dict) -> str:
    """The dry run's printout."""
    if e["teacher"] != "http":
        return f"dry run (privileged teacher): {e['rows']} rows, {e['key_frames']} key frames, no requests, $0"
    cost = "cost unknown (no price for this model: pass AnnotateConfig.prices)" if e["cost_usd"] is None else \
        f"cost ~${e['cost_usd']:.4f} (at most ${e['cost_usd_max']:.4f} if every answer used max_tokens)"
    how = f" in {e['batch_files']} Batch API file(s), batch price" if e.get("mode") == "batch" else ""
    images = "/".join(map(str, e.get("image_tokens_per_frame") or [])) or "-"
    return (f"dry run ({e['model']}): {e['rows']} rows, {e['key_frames']} key frames, {e['cached']} cached -> "
            f"{e['requests']} requests{how}, ~{e['input_tokens']:,} input ({images} per image) + "
            f"~{e['output_tokens']:,} output tokens, {cost}")
