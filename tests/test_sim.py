"""The robosuite wrapper: observation layout, image orientation, gripper sign, seeding, errors, target masks."""
import numpy as np
import pytest

pytest.importorskip("robosuite")

from refinevla.schema import ACTION_DIM, STATE_DIM  # noqa: E402
from refinevla.geometry import matrix_to_euler as mat2rpy  # noqa: E402
from refinevla.sim import TASKS, from_robosuite_action, make_task, to_robosuite_action  # noqa: E402


@pytest.fixture(scope="module")
def lift():
    task = make_task("lift", image_size=64, camera="agentview")  # a fixed camera: the projection test needs one
    yield task
    task.close()


def _action(gripper: float, dz: float = 0.0) -> np.ndarray:
    a = np.zeros(ACTION_DIM, np.float32)
    a[2], a[6] = dz, gripper
    return a


def test_observation_layout(lift):
    obs = lift.reset(0)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (STATE_DIM,) and obs["state"].dtype == np.float32
    assert obs["state"][6] == 0.0 and 0.0 <= obs["state"][7] <= 1.0
    assert obs["target_mask"].shape == (64, 64) and obs["target_mask"].dtype == np.uint8
    assert set(np.unique(obs["target_mask"])) <= {0, 255}
    assert obs["instruction"] == TASKS["lift"].instruction
    assert [o["role"] for o in obs["objects"]] == ["target"] and len(obs["objects"][0]["pos"]) == 3
    obs2, success = lift.step(_action(1.0))
    assert isinstance(success, bool) and not success
    assert obs2["image"].shape == (64, 64, 3)


def test_image_is_upright_and_mask_matches_it(lift):
    """The target's mask sits where the pinhole projection of its world position says (row 0 = top), and the
    image pixels under the mask are the red cube: image and mask share the upright orientation."""
    for seed in (0, 1):
        obs = lift.reset(seed)
        rows, cols = np.nonzero(obs["target_mask"])
        expected = lift.pixel_of(obs["objects"][0]["pos"])
        assert np.allclose([rows.mean(), cols.mean()], expected, atol=2.0)
        red = obs["image"][obs["target_mask"] > 0].astype(float).mean(0)
        assert red[0] > 1.5 * red[1] and red[0] > 1.5 * red[2]
        # the table (bright) fills the bottom of the picture; the dim background is at the top
        assert obs["image"][-8:].mean() > obs["image"][:4].mean() + 30


def test_gripper_conversion_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.uniform(-1, 1, ACTION_DIM).astype(np.float32)
        a[6] = rng.uniform(0, 1)
        assert np.allclose(from_robosuite_action(to_robosuite_action(a)), a, atol=1e-6)
    assert to_robosuite_action(_action(1.0))[6] == -1.0  # schema open -> robosuite open (-1)
    assert to_robosuite_action(_action(0.0))[6] == 1.0  # schema close -> robosuite close (+1)
    assert from_robosuite_action(np.r_[np.zeros(6), -1.0])[6] == 1.0
    assert to_robosuite_action(np.full(ACTION_DIM, 3.0))[:6].max() == 1.0  # deltas are clipped to [-1, 1]


def test_gripper_state_follows_schema_commands(lift):
    """Commanding 0 (close) shuts the fingers: opening -> ~0; commanding 1 (open) opens them: opening -> ~1."""
    lift.reset(0)
    for _ in range(12):
        obs, _ = lift.step(_action(0.0, dz=0.5))  # move up so the fingers close on nothing
    assert obs["state"][7] < 0.1
    for _ in range(12):
        obs, _ = lift.step(_action(1.0))
    assert obs["state"][7] > 0.9


def test_up_action_moves_end_effector_up(lift):
    z0 = lift.reset(0)["state"][2]
    for _ in range(5):
        obs, _ = lift.step(_action(1.0, dz=1.0))
    assert obs["state"][2] > z0 + 0.03


def test_same_seed_same_scene(lift):
    a = lift.reset(7)
    lift.step(_action(0.0, dz=1.0))
    b = lift.reset(7)
    c = lift.reset(8)
    assert a["objects"] == b["objects"]
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["state"], b["state"])
    assert a["objects"] != c["objects"]


def test_mat2rpy_identity_and_yaw():
    assert np.allclose(mat2rpy(np.eye(3)), 0.0)
    c, s = np.cos(0.3), np.sin(0.3)
    assert np.allclose(mat2rpy(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])), [0, 0, 0.3])


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match="lift"):
        make_task("fold_laundry")


@pytest.mark.parametrize("task,size", [("stack", 32), ("pick_place_can", 96)])
def test_target_mask_nonempty_at_reset(task, size):
    env = make_task(task, image_size=size)
    try:
        obs = env.reset(0)
        assert obs["image"].shape == (size, size, 3) and obs["target_mask"].shape == (size, size)
        assert (obs["target_mask"] > 0).sum() >= 4
        roles = [o["role"] for o in obs["objects"]]
        assert roles.count("target") == 1 and roles.count("goal") == 1
        assert all(o["pos"][2] < 2.0 for o in obs["objects"])  # parked (unused) objects are left out
    finally:
        env.close()


def test_pick_cube_instruction_names_the_target_by_seed():
    env = make_task("pick_cube", image_size=32)
    try:
        seen = {}
        for seed in (10_000, 10_001):
            obs = env.reset(seed)
            target = next(o for o in obs["objects"] if o["role"] == "target")
            seen[obs["instruction"]] = target["name"]
            assert [o["role"] for o in obs["objects"]].count("other") == 1  # the other cube is a distractor
            assert (obs["target_mask"] > 0).sum() >= 4
        assert seen == {"pick up the red cube": "red cube", "pick up the green cube": "green cube"}
        assert not env.success()  # on the table at reset
    finally:
        env.close()


def test_pick_cube_success_is_the_named_cube_lifted():
    from refinevla.experts import ExpertPolicy

    env, expert = make_task("pick_cube", image_size=32, segmentation=False), ExpertPolicy()
    try:
        obs = env.reset(10_001)  # the green cube
        expert.reset(obs["instruction"])
        for _ in range(env.max_steps):
            obs, success = env.step(expert.act(obs))
            if success:
                break
        assert success
        z = {o["name"]: o["pos"][2] for o in obs["objects"]}
        assert z["green cube"] > z["red cube"] + 0.03  # the named cube went up, the distractor stayed
    finally:
        env.close()
