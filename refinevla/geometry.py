"""Rotations in one place: quaternions, roll/pitch/yaw, axis-angle and matrices (numpy only).

Conventions, shared by every backend and dataset reader in the project:

- **Euler angles** are roll, pitch, yaw (rad) about *static* x, y, z axes: ``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)``.
  This is transforms3d's default axes "sxyz" (``euler2mat``, ``mat2euler``, ``euler2axangle``, which the
  SimplerEnv adapters call), scipy's ``Rotation.from_euler("xyz", ...)`` and the roll/pitch/yaw of the
  BridgeData V2 state.
- **Quaternions** are scalar first, ``(w, x, y, z)``, as transforms3d, MuJoCo and SAPIEN / ManiSkill store them.
  Data stored scalar last ``(x, y, z, w)`` (scipy, ROS, the Fractal LeRobot state) is read with
  ``order="xyzw"`` or converted with :func:`reorder_quat`. Quaternions need not be unit length; the all-zero
  quaternion (a padding row) is read as the identity.
- **Axis-angle** is a 3-vector ``axis * angle`` with the angle in [0, pi] (scipy's rotation vector).
- **Matrices** are 3x3 rotation matrices acting on column vectors; :func:`matrix_to_euler` also takes a flat
  row-major 9-vector, as MuJoCo's ``data.site_xmat`` stores it.

Every function works on one rotation or on a stack of them (leading dimensions broadcast), and returns float64.
Tests with known rotations: tests/test_geometry.py.
"""
from __future__ import annotations

import numpy as np

QUAT_ORDERS = ("wxyz", "xyzw")


def _check_order(order: str) -> None:
    if order not in QUAT_ORDERS:
        raise ValueError(f"quaternion order {order!r} is not one of {QUAT_ORDERS}")


def reorder_quat(q, src: str, dst: str) -> np.ndarray:
    """The same quaternions (..., 4) with their components reordered from ``src`` to ``dst`` ("wxyz"/"xyzw")."""
    _check_order(src)
    _check_order(dst)
    q = np.asarray(q, np.float64)
    if q.shape[-1:] != (4,):
        raise ValueError(f"a quaternion has 4 numbers, got an array of shape {q.shape}")
    return q[..., [src.index(c) for c in dst]]


def _unit_wxyz(q, order: str = "wxyz") -> np.ndarray:
    """Unit wxyz quaternions (..., 4); a zero quaternion becomes the identity."""
    q = reorder_quat(q, order, "wxyz")
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    identity = np.broadcast_to(np.array([1.0, 0.0, 0.0, 0.0]), q.shape)
    return np.where(norm > 0, q / np.where(norm > 0, norm, 1.0), identity)


def quat_multiply(a, b) -> np.ndarray:
    """Hamilton product ``a * b`` of wxyz quaternions: the rotation ``b`` first, then ``a``."""
    w1, x1, y1, z1 = np.moveaxis(np.asarray(a, np.float64), -1, 0)
    w2, x2, y2, z2 = np.moveaxis(np.asarray(b, np.float64), -1, 0)
    return np.stack([
        w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
    ], axis=-1)


def euler_to_quat(roll, pitch, yaw) -> np.ndarray:
    """wxyz quaternion of ``R = Rz(yaw) Ry(pitch) Rx(roll)`` (transforms3d ``euler2quat``, axes "sxyz").

    Scalars give shape (4,); arrays of angles give (..., 4).
    """
    r, p, y = (np.asarray(v, np.float64) / 2 for v in (roll, pitch, yaw))
    cr, sr, cp, sp, cy, sy = np.cos(r), np.sin(r), np.cos(p), np.sin(p), np.cos(y), np.sin(y)
    return np.stack([cr * cp * cy + sr * sp * sy,
                     sr * cp * cy - cr * sp * sy,
                     cr * sp * cy + sr * cp * sy,
                     cr * cp * sy - sr * sp * cy], axis=-1)


def quat_to_matrix(q, order: str = "wxyz") -> np.ndarray:
    """Quaternions (..., 4) (need not be unit) -> rotation matrices (..., 3, 3)."""
    w, x, y, z = np.moveaxis(_unit_wxyz(q, order), -1, 0)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def euler_to_matrix(rpy) -> np.ndarray:
    """roll, pitch, yaw (..., 3) -> ``Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (..., 3, 3)."""
    rpy = np.asarray(rpy, np.float64)
    return quat_to_matrix(euler_to_quat(rpy[..., 0], rpy[..., 1], rpy[..., 2]))


def matrix_to_euler(m) -> np.ndarray:
    """Rotation matrices (..., 3, 3), or flat row-major (..., 9), -> roll, pitch, yaw (..., 3).

    The inverse of :func:`euler_to_matrix` with pitch in [-pi/2, pi/2] (transforms3d ``mat2euler``, axes
    "sxyz"). At gimbal lock (pitch = +-pi/2) roll and yaw are not separable: yaw is set to 0.
    """
    m = np.asarray(m, np.float64)
    if m.shape[-1:] == (9,):
        m = m.reshape(*m.shape[:-1], 3, 3)
    if m.shape[-2:] != (3, 3):
        raise ValueError(f"a rotation matrix is 3x3 (or 9 numbers), got an array of shape {m.shape}")
    cos_pitch = np.hypot(m[..., 0, 0], m[..., 1, 0])
    pitch = np.arctan2(-m[..., 2, 0], cos_pitch)
    regular = cos_pitch > 1e-9
    roll = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 2]), np.arctan2(-m[..., 1, 2], m[..., 1, 1]))
    yaw = np.where(regular, np.arctan2(m[..., 1, 0], m[..., 0, 0]), 0.0)
    return np.stack([roll, pitch, yaw], axis=-1)


def quat_to_euler(q, order: str = "wxyz") -> np.ndarray:
    """Quaternions (..., 4) -> roll, pitch, yaw (..., 3) (static x-y-z, ``R = Rz(yaw) Ry(pitch) Rx(roll)``)."""
    return matrix_to_euler(quat_to_matrix(q, order))


def quat_to_axis_angle(q, order: str = "wxyz") -> np.ndarray:
    """Quaternions (..., 4) -> axis * angle (..., 3), angle in [0, pi] (the shorter way round)."""
    q = _unit_wxyz(q, order)
    q = np.where(q[..., :1] < 0, -q, q)            # q and -q are the same rotation; take w >= 0
    v = q[..., 1:]
    s = np.linalg.norm(v, axis=-1, keepdims=True)
    angle = 2.0 * np.arctan2(s, q[..., :1])
    # near the identity angle / s -> 2 (first order); exactly zero for the identity
    return np.where(s > 1e-12, v / np.where(s > 1e-12, s, 1.0) * angle, 2.0 * v)


def axis_angle_to_quat(rotvec) -> np.ndarray:
    """axis * angle (..., 3) -> unit wxyz quaternions (..., 4)."""
    v = np.asarray(rotvec, np.float64)
    angle = np.linalg.norm(v, axis=-1, keepdims=True)
    # sin(angle / 2) / angle, with its limit 1/2 at angle 0
    scale = np.where(angle > 1e-12, np.sin(angle / 2) / np.where(angle > 1e-12, angle, 1.0), 0.5)
    return np.concatenate([np.cos(angle / 2), v * scale], axis=-1)


def euler_to_axis_angle(rpy) -> np.ndarray:
    """roll, pitch, yaw (..., 3) -> axis * angle (..., 3), angle in [0, pi].

    The same rotation as transforms3d ``euler2axangle`` (which SimplerEnv's adapters call, returning axis and
    angle apart); for the small deltas a policy emits the two are identical (transforms3d does not fold
    angles above pi into [0, pi]: it then describes the same rotation the other way round).
    """
    rpy = np.asarray(rpy, np.float64)
    return quat_to_axis_angle(euler_to_quat(rpy[..., 0], rpy[..., 1], rpy[..., 2]))


def axis_angle_to_matrix(rotvec) -> np.ndarray:
    """axis * angle (..., 3) -> rotation matrices (..., 3, 3) (Rodrigues' formula)."""
    return quat_to_matrix(axis_angle_to_quat(rotvec))


__all__ = [
    "QUAT_ORDERS", "reorder_quat", "quat_multiply", "euler_to_quat", "quat_to_matrix", "euler_to_matrix",
    "matrix_to_euler", "quat_to_euler", "quat_to_axis_angle", "axis_angle_to_quat", "euler_to_axis_angle",
    "axis_angle_to_matrix",
]
