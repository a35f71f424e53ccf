"""What the HTTP teacher sends and how its answer is read: the prompt, the request body, the cache key.

One request body serves online requests and Batch API lines alike. The body fits today's models:
`max_completion_tokens` instead of `max_tokens` where the endpoint wants it (OpenAI's gpt-5 and o-series refuse
`max_tokens` with a 400; https://platform.openai.com/docs/api-reference/chat/create), no `temperature` for those
models (any value but 1 is a 400 there: https://github.com/tmc/langchaingo/issues/1355), `reasoning_effort` (OpenAI;
Gemini's OpenAI-compatible endpoint maps "none" / "low" / "medium" / "high" to its thinking budget,
https://ai.google.dev/gemini-api/docs/openai), and `extra_body`, passed through as is.

The cache key covers the model, temperature, max_tokens, json_schema, the prompt version, reasoning_effort and
extra_body (when set), the image pixels, the instruction, the state and the action. It leaves out `base_url` (the
same model behind a proxy reuses the cache) and which name the token limit is sent under.
"""
from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import ValidationError

from ..schema import RATIONALE_PARTS
from .frames import hash_inputs, load_objects, read_rows
from .rationale import Rationale

#: Version of the prompt below; bump it whenever a word of SYSTEM_PROMPT or user_text changes.
PROMPT_VERSION = "http-v1"
TOKEN_PARAMS = ("max_tokens", "max_completion_tokens")

SYSTEM_PROMPT = (
    "You are an expert robot teacher. Given a robot camera frame, the task instruction, the robot state and "
    "the action the expert took, explain the expert's reasoning as JSON with exactly four string fields:\n"
    '"observation": the objects in the scene and the gripper;\n'
    '"situation_analysis": where the task stands (e.g. approaching, grasping, holding the object);\n'
    '"spatial_reasoning": where the target object is relative to the gripper, with approximate distances in cm;\n'
    '"task_planning": the next sub-goal.\n'
    "Directions are in the robot's world frame: 'ahead of' = away from the robot base, 'behind' = toward it, "
    "'left of' / 'right of' = the robot's left / right (the camera faces the robot, so the robot's left is on "
    "the right of the picture), 'above' / 'below' = up / down. Use plain words, at most 15 words per field, "
    "and answer with the JSON object only.")
RESPONSE_SCHEMA = {
    "type": "object",
    "properties": {p: {"type": "string"} for p in RATIONALE_PARTS},
    "required": list(RATIONALE_PARTS),
    "additionalProperties": False,
}


@dataclass
class Job:
    """One key frame to annotate: what is sent, and what the faithfulness check needs."""
    index: int
    key: str
    image: np.ndarray
    instruction: str
    state: list
    action: list
    objects: list


def user_text(instruction: str, state, action) -> str:
    """The text beside the image: instruction, state and the action the expert took (schema conventions)."""
    s, a = [float(v) for v in state], [float(v) for v in action]
    return (f"Instruction: {instruction}\n"
            f"Gripper position (m): x={s[0]:.3f} y={s[1]:.3f} z={s[2]:.3f}; roll={s[3]:.2f} pitch={s[4]:.2f} "
            f"yaw={s[5]:.2f} rad; gripper opening {s[7]:.2f} (1 = open)\n"
            f"Action taken: dx={a[0]:.3f} dy={a[1]:.3f} dz={a[2]:.3f} droll={a[3]:.3f} dpitch={a[4]:.3f} "
            f"dyaw={a[5]:.3f} gripper={a[6]:.2f} (1 = open, 0 = close)")


def png_data_url(image: np.ndarray) -> str:
    """The frame as a base64 PNG data URL (the OpenAI image_url format every compatible server reads)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # fast: bytes do not change image tokens
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_messages(job: Job) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [
                {"type": "text", "text": user_text(job.instruction, job.state, job.action)},
                {"type": "image_url", "image_url": {"url": png_data_url(job.image)}}]}]


def reasoning_model(model: str) -> bool:
    """OpenAI's reasoning models (o1, o3, o4-mini, gpt-5...), by name."""
    name = model.rsplit("/", 1)[-1].lower()
    return bool(re.match(r"(o\d|gpt-5)", name))


def wants_completion_tokens(model: str) -> bool:
    """OpenAI's reasoning models refuse `max_tokens`: they take max_completion_tokens."""
    return reasoning_model(model)


def sends_temperature(cfg) -> bool:
    """Whether `temperature` goes in the body: not for OpenAI's reasoning models, which answer 400 to any value but
    their default 1 ("Unsupported value: 'temperature' does not support 0 with this model"); an online run also
    drops it when another endpoint's 400 names it (refinevla.teacher.online)."""
    return not reasoning_model(cfg.model)


def refuses_temperature(error: Exception) -> bool:
    """A 400 that refuses the temperature we sent (OpenAI's unsupported_value / unsupported_parameter text)."""
    return getattr(error, "status_code", None) == 400 and "temperature" in str(error).lower()


def token_param(cfg) -> str:
    """The name the token limit is sent under: cfg.token_limit_param, or by model name when it is "auto" (an online
    run also switches when the endpoint's 400 asks for the other one)."""
    if cfg.token_limit_param != "auto":
        return cfg.token_limit_param
    return "max_completion_tokens" if wants_completion_tokens(cfg.model) else "max_tokens"


def request_body(cfg, messages: list[dict], limit_param: str | None = None, temperature: bool | None = None) -> dict:
    """The chat-completions request body (the same online and in a batch file); `extra_body` goes in last.
    ``temperature``: send cfg.temperature (None: ``sends_temperature(cfg)``)."""
    body = {"model": cfg.model, "messages": messages, limit_param or token_param(cfg): cfg.max_tokens}
    if sends_temperature(cfg) if temperature is None else temperature:
        body["temperature"] = cfg.temperature
    if cfg.json_schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "rationale", "strict": True, "schema": RESPONSE_SCHEMA}}
    if cfg.reasoning_effort:
        body["reasoning_effort"] = cfg.reasoning_effort
    body.update(cfg.extra_body or {})
    return body


def parse_answer(content: str | None, finish_reason: str | None = None) -> tuple[Rationale | None, str]:
    """Validate the model's text as a Rationale (tolerating ```json fences); (None, reason) if it is not one."""
    if not content:
        if finish_reason == "length":
            return None, ("empty answer (finish_reason=length: thinking used up the token limit; raise max_tokens "
                          "or set reasoning_effort lower, e.g. none)")
        return None, "empty answer"
    text = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", content)
    try:
        return Rationale.model_validate_json(text), ""
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'answer'}: {x['msg']}" for x in e.errors()[:4])
        return None, f"invalid rationale JSON ({errors})"


def repair_prompt(reason: str) -> str:
    return (f"Your answer was not valid: {reason}. Reply with only a JSON object with exactly the string "
            f"fields {', '.join(RATIONALE_PARTS)}, at most 15 words each.")


def cache_key(cfg, image: np.ndarray, instruction: str, state, action) -> str:
    """Hash of everything that determines the answer (see the module docstring)."""
    extra = [cfg.reasoning_effort, cfg.extra_body] if (cfg.reasoning_effort or cfg.extra_body) else []
    return hash_inputs("http", cfg.model, cfg.temperature, cfg.max_tokens, cfg.json_schema, PROMPT_VERSION, *extra,
                       image, instruction, np.asarray(state, np.float32), np.asarray(action, np.float32))


def jobs(demos, keys: list[int], cfg):
    """Read each key frame once (image decoded here, in the main thread) and build its job."""
    for i, row in read_rows(demos, keys, ["image", "instruction", "state", "action", "objects"]):
        image = row["image"]
        key = cache_key(cfg, image, row["instruction"], row["state"], row["action"])
        yield Job(i, key, image, row["instruction"], list(row["state"]), list(row["action"]),
                  load_objects(row.get("objects"), f"row {i}"))
