"""The policy interface every actor implements: the fine-tuned VLA, the scripted experts, a random policy.

An observation is a dict with at least ``image`` (uint8 HxWx3, upright), ``state`` (float32[8]) and
``instruction`` (str); simulator backends may add privileged keys (``objects``, ``phase``) that only
scripted experts read. An action is float32[7] in the schema convention of ``refinevla.schema``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .schema import ACTION_DIM


@runtime_checkable
class Policy(Protocol):
    """reset() once per episode with the instruction, then act() once per control step."""

    def reset(self, instruction: str) -> None: ...

    def act(self, obs: dict) -> np.ndarray: ...


class RandomPolicy:
    """Uniform random deltas in [-1, 1] and a random gripper: the floor every success rate is read against."""

    def __init__(self, seed: int = 0, scale: float = 1.0):
        self.rng = np.random.default_rng(seed)
        self.scale = scale

    def reset(self, instruction: str) -> None:
        pass

    def act(self, obs: dict) -> np.ndarray:
        action = self.rng.uniform(-self.scale, self.scale, ACTION_DIM).astype(np.float32)
        action[6] = float(self.rng.random() < 0.5)
        return action


class ZeroPolicy:
    """Does nothing, at no cost: what the harness-overhead benchmark measures against."""

    def reset(self, instruction: str) -> None:
        pass

    def act(self, obs: dict) -> np.ndarray:
        action = np.zeros(ACTION_DIM, np.float32)
        action[6] = 1.0
        return action
