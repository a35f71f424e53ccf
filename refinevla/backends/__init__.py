"""Evaluation backends: the simulators the harness (``refinevla.evaluate``) runs a policy in.

A backend is a module exposing ``TASKS`` (the known task names), ``make_task(task, image_size=...,
segmentation=...)`` (and, when it accepts them, ``camera=`` and ``split=``) returning an environment with
``reset(seed) -> obs``, ``step(action) -> (obs, success)``, ``max_steps`` and ``close()``, and optionally
``has_state(task, backend)`` (whether the observation's ``state`` is a real end-effector pose; default yes).
``BACKENDS`` names them:

- ``robosuite`` (``refinevla.sim``): the embedded study's tasks, on a CPU;
- ``simpler_env`` (alias ``simpler``; ``refinevla.backends.simpler``): SimplerEnv's WidowX and Google Robot tasks
  (GPU), run with SimplerEnv's own protocol (every episode to the step limit, success at the last step);
- ``maniskill3``: ManiSkill3's ports of the four WidowX tasks (a CPU with a software Vulkan), same protocol.

The SimplerEnv code is split by concern: ``simpler_tasks`` (the task table and episode plan), ``simpler_convert``
(pure-numpy action / observation conversions), ``simpler_env`` and ``maniskill3`` (the two simulators) and
``simpler`` (the environment wrapper, the protocol's run loop and its results table).
"""
from __future__ import annotations

import importlib

#: backend name -> module implementing the backend contract above
BACKENDS = {
    "robosuite": "refinevla.sim",
    "simpler_env": "refinevla.backends.simpler",
    "maniskill3": "refinevla.backends.simpler",
    "simpler": "refinevla.backends.simpler",
}
#: backends run with SimplerEnv's protocol (``refinevla.backends.simpler.run``) rather than the harness's loop
PROTOCOL_BACKENDS = ("simpler_env", "maniskill3", "simpler")


class SimulatorNotInstalledError(ImportError):
    """The simulator package a backend needs cannot be imported; the message says how to install it."""


class StateUnavailableError(RuntimeError):
    """A state-conditioned policy was asked to act on a task whose observation has no end-effector state."""


def backend_module(name: str):
    """The module implementing backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known backends: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def uses_state(policy) -> bool:
    """Whether ``policy`` conditions its actions on ``obs["state"]``: its ``uses_state`` attribute when it declares
    one, else a VLA whose tokenizer has state bins (the prompt carries the state), else False (scripted experts
    read privileged objects, random and zero policies nothing)."""
    declared = getattr(policy, "uses_state", None)
    if declared is not None:
        return bool(declared)
    inner = getattr(policy, "vla", None)  # a policy wrapping a VLA (the teacher-rationale oracle)
    if inner is not None:
        return uses_state(inner)
    tok = getattr(policy, "tok", None)
    return tok is not None and len(getattr(tok, "state_ids", ()) or ()) > 0


def check_state(policy, backend_name: str, task: str) -> None:
    """Refuse (StateUnavailableError, one line) to run a state-conditioned policy on a task of backend
    ``backend_name`` whose observation has no end-effector state: the policy would act on zeros."""
    has_state = getattr(backend_module(backend_name), "has_state", None)
    if has_state is None or has_state(task, backend_name) or not uses_state(policy):
        return
    raise StateUnavailableError(
        f"evaluate.backend={backend_name!r}, task {task!r}: this simulator gives no end-effector state and the "
        f"policy ({type(policy).__name__}) is state-conditioned, so it would act on zeros; evaluate a policy "
        f"trained without state, another task, or SimplerEnv with the allenzren/ManiSkill2_real2sim fork "
        f"(see book/simplerenv.md)")
