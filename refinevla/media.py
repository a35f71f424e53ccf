"""Pictures of episodes for the book: a strip of a few frames (PNG) and an animated GIF with a caption.

    save_strip(frames, "strips/lift.png", n=4)
    save_episode_gif(frames, captions, "videos/lift_in_distribution_success.gif", outcome="success")

Frames are uint8 HxWx3 images as the policy saw them (64 px at the embedded scale); both writers upsample them
with nearest-neighbour (pixels stay pixels) to a legible size. Pillow only.
"""
from __future__ import annotations

import math
import os
import textwrap
import uuid
from pathlib import Path

import numpy as np

#: GIF frame side at least this many pixels (the picture; the caption band comes below it)
MIN_VIDEO_SIZE = 192
#: seconds per GIF frame: 5 control steps per second, slower than the 20 Hz control so that a reader can follow
FRAME_S = 0.2


def save_strip(frames: list, path, n: int = 4, min_height: int = 128) -> None:
    """Save ``n`` evenly spaced frames (first and last included) side by side as one PNG, upscaled to be legible."""
    from PIL import Image

    idx = np.unique(np.linspace(0, len(frames) - 1, max(1, n)).round().astype(int))
    picked = [np.asarray(frames[i], dtype=np.uint8) for i in idx]
    h, w = picked[0].shape[:2]
    gap = 2
    strip = np.full((h, len(picked) * (w + gap) - gap, 3), 255, np.uint8)
    for k, img in enumerate(picked):
        strip[:, k * (w + gap): k * (w + gap) + w] = img
    scale = max(1, math.ceil(min_height / h))
    image = Image.fromarray(strip).resize((strip.shape[1] * scale, h * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def caption_lines(step: int, steps: int, outcome: str, rationale: str, width: int) -> list[str]:
    """The caption of one frame: "step k/n  outcome" and the current rationale wrapped to ``width`` characters
    (at most 4 lines; a longer rationale ends in "...")."""
    head = f"step {step}/{steps}  {outcome}"
    body = textwrap.wrap(" ".join(str(rationale or "").split()), width=max(8, width))
    if len(body) > 4:
        body = body[:3] + [body[3][: max(0, width - 3)] + "..."]
    return [head] + body


def save_episode_gif(frames: list, rationales: list, path, outcome: str, min_size: int = MIN_VIDEO_SIZE,
                     frame_s: float = FRAME_S) -> Path:
    """Write an episode as an animated GIF: each frame upsampled to at least ``min_size`` px, with a caption band
    below it giving the step counter, the outcome ("success" / "failure") and the rationale the policy acted on
    at that step (empty for a policy that does not reason). ``rationales[i]`` goes with ``frames[i]``."""
    from PIL import Image, ImageDraw

    if not frames:
        raise ValueError(f"save_episode_gif: no frames for {path}")
    first = np.asarray(frames[0], dtype=np.uint8)
    h, w = first.shape[:2]
    scale = max(1, math.ceil(min_size / min(h, w)))
    W, H = w * scale, h * scale
    font, line_h = _font()
    char_w = font.getlength("the quick brown fox jumps over a lazy dog") / 41
    width = int((W - 8) // char_w)
    band = line_h * 5 + 8
    steps = len(frames) - 1
    images = []
    for i, frame in enumerate(frames):
        canvas = Image.new("RGB", (W, H + band), (255, 255, 255))
        canvas.paste(Image.fromarray(np.asarray(frame, dtype=np.uint8)).resize((W, H), Image.NEAREST), (0, 0))
        draw = ImageDraw.Draw(canvas)
        text = rationales[i] if i < len(rationales) else ""
        lines = caption_lines(i, steps, outcome, text, width)
        while width > 8 and max(font.getlength(line) for line in lines) > W - 8:  # wrap by drawn width
            width -= 1
            lines = caption_lines(i, steps, outcome, text, width)
        for k, line in enumerate(lines):
            draw.text((4, H + 4 + k * line_h), line, fill=(0, 0, 0) if k else _COLOURS.get(outcome, (0, 0, 0)),
                      font=font)
        images.append(canvas.convert("P", palette=Image.ADAPTIVE, colors=255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of this writer's own: two workers may write the same task's first failure at once (the last rename wins)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.gif")
    images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(frame_s * 1000), loop=0,
                   optimize=False)
    tmp.replace(path)
    return path


_COLOURS = {"success": (0, 120, 0), "failure": (170, 0, 0)}


def _font():
    """(font, line height): Pillow's bundled scalable font at 13 px where Pillow has FreeType, else its bitmap
    font."""
    from PIL import ImageFont, features

    if features.check("freetype2"):
        return ImageFont.load_default(size=13), 16
    return ImageFont.load_default(), 12
