"""Rotations (refinevla/geometry.py) against known rotations and an independent implementation (scipy).

`pytest tests/test_geometry.py -q`
"""
import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from refinevla import geometry as G

HALF = math.sqrt(0.5)


def rx(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def ry(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rz(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# Known rotations: (roll, pitch, yaw), wxyz quaternion, axis * angle
KNOWN = [
    ((0.0, 0.0, 0.0), (1, 0, 0, 0), (0, 0, 0)),
    ((math.pi / 2, 0.0, 0.0), (HALF, HALF, 0, 0), (math.pi / 2, 0, 0)),
    ((0.0, math.pi / 4, 0.0), (math.cos(math.pi / 8), 0, math.sin(math.pi / 8), 0), (0, math.pi / 4, 0)),
    ((0.0, 0.0, math.pi / 2), (HALF, 0, 0, HALF), (0, 0, math.pi / 2)),
    ((0.0, 0.0, -0.3), (math.cos(0.15), 0, 0, -math.sin(0.15)), (0, 0, -0.3)),
    ((math.pi, 0.0, 0.0), (0, 1, 0, 0), (math.pi, 0, 0)),
    # Rz(90) Rx(90) maps x -> y, y -> z, z -> x: 120 degrees about (1, 1, 1)
    ((math.pi / 2, 0.0, math.pi / 2), (0.5, 0.5, 0.5, 0.5), tuple(np.ones(3) / math.sqrt(3) * 2 * math.pi / 3)),
]


@pytest.mark.parametrize("rpy, quat, rotvec", KNOWN)
def test_known_rotations_in_every_representation(rpy, quat, rotvec):
    matrix = rz(rpy[2]) @ ry(rpy[1]) @ rx(rpy[0])
    np.testing.assert_allclose(G.euler_to_quat(*rpy), quat, atol=1e-12)
    np.testing.assert_allclose(G.euler_to_matrix(rpy), matrix, atol=1e-12)
    np.testing.assert_allclose(G.quat_to_matrix(quat), matrix, atol=1e-12)
    np.testing.assert_allclose(G.euler_to_axis_angle(rpy), rotvec, atol=1e-12)
    np.testing.assert_allclose(G.quat_to_axis_angle(quat), rotvec, atol=1e-12)
    np.testing.assert_allclose(G.axis_angle_to_matrix(rotvec), matrix, atol=1e-12)
    np.testing.assert_allclose(G.matrix_to_euler(matrix), rpy, atol=1e-12)
    np.testing.assert_allclose(G.quat_to_euler(quat), rpy, atol=1e-12)


def test_a_known_rotation_moves_a_vector_as_expected():
    """Yaw 90 degrees turns x into y; roll 90 degrees turns y into z."""
    np.testing.assert_allclose(G.euler_to_matrix([0, 0, math.pi / 2]) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(G.euler_to_matrix([math.pi / 2, 0, 0]) @ [0, 1, 0], [0, 0, 1], atol=1e-12)


def test_random_rotations_match_scipy_and_round_trip():
    rng = np.random.default_rng(0)
    rpy = rng.uniform([-math.pi, -1.5, -math.pi], [math.pi, 1.5, math.pi], size=(200, 3))
    ref = Rotation.from_euler("xyz", rpy)          # scipy: lower-case = static axes
    quat = G.euler_to_quat(rpy[:, 0], rpy[:, 1], rpy[:, 2])
    assert quat.shape == (200, 4)
    # scipy stores scalar last; q and -q are the same rotation
    ref_wxyz = G.reorder_quat(ref.as_quat(), "xyzw", "wxyz")
    np.testing.assert_allclose(np.abs(np.sum(quat * ref_wxyz, axis=1)), 1.0, atol=1e-12)
    np.testing.assert_allclose(G.quat_to_matrix(quat), ref.as_matrix(), atol=1e-12)
    np.testing.assert_allclose(G.euler_to_axis_angle(rpy), ref.as_rotvec(), atol=1e-9)
    np.testing.assert_allclose(G.matrix_to_euler(ref.as_matrix()), rpy, atol=1e-9)
    np.testing.assert_allclose(G.axis_angle_to_matrix(ref.as_rotvec()), ref.as_matrix(), atol=1e-12)
    assert np.all(np.linalg.norm(G.euler_to_axis_angle(rpy), axis=1) <= math.pi + 1e-12)


def test_quat_multiply_composes_rotations():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 4))
    expected = G.quat_to_matrix(a) @ G.quat_to_matrix(b)      # b first, then a
    np.testing.assert_allclose(G.quat_to_matrix(G.quat_multiply(a, b)), expected, atol=1e-12)
    # a half turn about z after a yaw of -0.09: the SimplerEnv robot start orientation
    q = G.quat_multiply(G.euler_to_quat(0.0, 0.0, -0.09), [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(G.quat_to_matrix(q), rz(-0.09) @ rz(math.pi), atol=1e-12)


def test_scalar_last_order_and_unnormalised_and_zero_quaternions():
    xyzw = np.array([[0, 0, HALF, HALF], [0, 0, 0, 1.0]])         # yaw 90 degrees, identity
    np.testing.assert_allclose(G.quat_to_euler(xyzw, order="xyzw"), [[0, 0, math.pi / 2], [0, 0, 0]], atol=1e-12)
    np.testing.assert_allclose(G.reorder_quat(xyzw, "xyzw", "wxyz"), [[HALF, 0, 0, HALF], [1, 0, 0, 0]])
    np.testing.assert_allclose(G.quat_to_matrix([2.0, 0, 0, 0]), np.eye(3))           # scale does not matter
    np.testing.assert_allclose(G.quat_to_matrix([-HALF, -HALF, 0, 0]), rx(math.pi / 2), atol=1e-12)  # -q == q
    np.testing.assert_allclose(G.quat_to_euler(np.zeros((3, 4))), np.zeros((3, 3)))  # padding rows
    with pytest.raises(ValueError, match="order 'zyxw'"):
        G.quat_to_euler(xyzw, order="zyxw")
    with pytest.raises(ValueError, match="4 numbers"):
        G.quat_to_matrix([1.0, 0.0, 0.0])


def test_matrix_to_euler_flat_xmat_and_gimbal_lock():
    m = rz(0.3) @ ry(-0.2) @ rx(0.1)
    np.testing.assert_allclose(G.matrix_to_euler(m.reshape(9)), [0.1, -0.2, 0.3], atol=1e-12)   # MuJoCo xmat
    np.testing.assert_allclose(G.matrix_to_euler(np.stack([m.reshape(9)] * 2)), [[0.1, -0.2, 0.3]] * 2, atol=1e-12)
    locked = rz(0.4) @ ry(math.pi / 2) @ rx(0.1)          # only roll - yaw is defined
    rpy = G.matrix_to_euler(locked)
    assert rpy[2] == 0.0 and rpy[1] == pytest.approx(math.pi / 2)
    np.testing.assert_allclose(G.euler_to_matrix(rpy), locked, atol=1e-9)
    with pytest.raises(ValueError, match="3x3"):
        G.matrix_to_euler(np.eye(4))


def test_small_rotations_are_exact_near_the_identity():
    tiny = np.array([1e-14, -2e-14, 3e-14])
    np.testing.assert_allclose(G.euler_to_axis_angle(tiny), tiny, atol=1e-20)
    np.testing.assert_allclose(G.axis_angle_to_quat(np.zeros(3)), [1, 0, 0, 0])
    np.testing.assert_allclose(G.euler_to_axis_angle(np.zeros(3)), np.zeros(3))
