"""Read a LeRobotDataset v2.x (a local folder or a hub dataset) into the project's row schema.

The paper annotates BridgeData V2 (WidowX) and Fractal (RT-1, Google Robot). Their LeRobot re-hosts,
``IPEC-COMMUNITY/bridge_orig_lerobot`` and ``IPEC-COMMUNITY/fractal20220817_data_lerobot``, are ~21 GB each,
so this reader fetches only the files of the episodes asked for (one ``hf_hub_download`` per file, all at one
commit: by default each dataset's pinned v2.x commit) and decodes only the frames kept.

The package, imported one way (each module only from those above it)::

    conventions.py   each known dataset's conventions (camera, state / action layout, gripper sign, control
                     rate, pinned revision), with the public sources that confirm them; the map to the schema
    hub.py           a dataset's files (local folder or hub, pinned to one commit) and its meta/ folder
    reader.py        which episodes and frames; one episode's parquet rows and video frames as schema rows
    api.py           load_lerobot, inspect_lerobot, provenance; action statistics and the gripper check

Public API: :func:`load_lerobot`, :func:`inspect_lerobot`, :func:`action_stats`, :func:`gripper_agreement`,
:func:`provenance`, :class:`Conventions` (``BRIDGE``, ``FRACTAL``, :func:`generic_conventions`) and
:class:`LeRobotFormatError`. Tests: tests/test_lerobot.py (a tiny dataset written in the v2.x layout by
tests/lerobot_fixture.py, and a local stand-in for the hub).
"""
from .api import action_stats, gripper_agreement, inspect_lerobot, load_lerobot, provenance
from .conventions import (
    BRIDGE, FRACTAL, KNOWN_CONVENTIONS, Conventions, LeRobotFormatError, generic_conventions, quat_to_rpy,
)
from .reader import frame_indices, select_episodes

__all__ = [
    "LeRobotFormatError", "Conventions", "BRIDGE", "FRACTAL", "KNOWN_CONVENTIONS", "generic_conventions",
    "load_lerobot", "inspect_lerobot", "action_stats", "gripper_agreement", "provenance", "quat_to_rpy",
    "select_episodes", "frame_indices",
]
