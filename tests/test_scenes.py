"""Scene splits on real robosuite: seeds decide the variant, the default comes back pixel-exact, the task objects
keep their look, the picture stays visible, the camera moves only a little."""
import json

import numpy as np
import pytest

pytest.importorskip("robosuite")

from refinevla.scenes import SPLITS, SceneVariants, describe_split  # noqa: E402
from refinevla.sim import make_task  # noqa: E402

SEEDS = (0, 1, 2)


def _render(task, segmentation=False):
    """Render with this task's GL context current (SimTask.render does not select it; two tasks live here)."""
    task.env.sim._render_context_offscreen.gl_ctx.make_current()
    return task.render(segmentation=segmentation)


def _cube(task):
    """Mean RGB of the target cube's visible pixels."""
    _render(task)
    mask = task.target_mask() > 0
    assert mask.sum() > 10, "the cube must stay in view"
    return _render(task)[mask].astype(float).mean(0)


def _snapshot(task):
    """Everything a modder may write: lights, cameras, colours, materials, textures."""
    m = task.env.sim.model._model
    keys = ("light_pos", "light_dir", "light_diffuse", "light_ambient", "light_specular", "light_active", "cam_pos",
            "cam_quat", "cam_fovy", "geom_rgba", "mat_rgba", "mat_specular", "mat_shininess", "mat_reflectance",
            "tex_data")
    return {k: np.array(getattr(m, k)) for k in keys}


@pytest.fixture(scope="module")
def wrist():
    """The eye-in-hand lift task, its fresh default renders (before any modder exists) and its SceneVariants."""
    task = make_task("lift", image_size=64, segmentation=True, camera="robot0_eye_in_hand")
    defaults = {}
    for seed in SEEDS:
        task.reset(seed)
        defaults[seed] = (_render(task), _cube(task), _snapshot(task))
    scenes = SceneVariants(task, task.camera)
    yield task, scenes, defaults
    task.close()


def _episode(task, scenes, split, seed):
    task.reset(seed)
    info = scenes.apply(split, seed)
    return _render(task), info


def test_splits_and_unknown_split(wrist):
    task, scenes, _ = wrist
    assert SPLITS == ("in_distribution", "variant")
    assert all(isinstance(describe_split(s), str) and describe_split(s) for s in SPLITS)
    for bad in (lambda: scenes.apply("test", 0), lambda: describe_split("test")):
        with pytest.raises(ValueError, match="in_distribution"):
            bad()


def test_only_arena_geoms_are_touched(wrist):
    task, scenes, defaults = wrist
    m = task.env.sim.model._model
    names = [m.geom(g).name for g in scenes.geoms]
    assert any("floor" in n for n in names) and any("wall" in n for n in names) and "table_visual" in names
    cube = set(task._geoms_of("cube").tolist())
    assert not cube & set(scenes.geoms)
    # after a variant, every byte of the cube (colour, material, texture) is the default's
    _episode(task, scenes, "variant", 0)
    after, before = _snapshot(task), defaults[0][2]
    mats = [int(i) for i in m.geom_matid[sorted(cube)] if i >= 0]
    texs = [int(m.mat_texid[i, 1]) for i in mats if m.mat_texid[i, 1] >= 0]
    assert np.array_equal(after["geom_rgba"][sorted(cube)], before["geom_rgba"][sorted(cube)])
    assert np.array_equal(after["mat_rgba"][mats], before["mat_rgba"][mats]) and texs
    for t in texs:
        span = slice(m.tex_adr[t], m.tex_adr[t] + m.tex_width[t] * m.tex_height[t] * m.tex_nchannel[t])
        assert np.array_equal(after["tex_data"][span], before["tex_data"][span])
    assert not np.array_equal(after["tex_data"], before["tex_data"])  # the arena textures did change
    assert SceneVariants(task.env, task.camera).geoms == scenes.geoms  # a bare robosuite env works too


def test_variant_is_a_function_of_the_seed(wrist):
    task, scenes, defaults = wrist
    a, info_a = _episode(task, scenes, "variant", 1)
    b, _ = _episode(task, scenes, "variant", 2)
    in_dist, _ = _episode(task, scenes, "in_distribution", 1)
    again, info_again = _episode(task, scenes, "variant", 1)  # after other scenes: the same picture
    assert np.array_equal(a, again) and info_a == info_again
    json.dumps(info_a)
    assert set(info_a) == {"split", "seed", "textures", "lights", "camera"} and info_a["textures"]
    assert np.abs(a.astype(int) - b).mean() > 10  # two variants look different
    assert np.abs(a.astype(int) - in_dist).mean() > 10  # and unlike the default scene of the same seed
    assert np.array_equal(in_dist, defaults[1][0])


def test_in_distribution_after_variant_is_the_fresh_default(wrist):
    """Pixel-exact (the software renderer is deterministic), and so is every modified model field."""
    task, scenes, defaults = wrist
    for seed in SEEDS:
        _episode(task, scenes, "variant", seed + 10)
        image, info = _episode(task, scenes, "in_distribution", seed)
        assert info == {"split": "in_distribution", "seed": seed}
        assert np.array_equal(image, defaults[seed][0])
        snap = _snapshot(task)
        assert all(np.array_equal(snap[k], v) for k, v in defaults[seed][2].items()), seed


def test_camera_moves_a_little(wrist):
    task, scenes, _ = wrist
    for seed in range(8):
        cam = scenes.apply("variant", seed)["camera"]
        assert cam["name"] == "robot0_eye_in_hand"
        assert 0 < cam["shift_mm"] <= 10 * 3**0.5 + 1e-6
        assert 0 < cam["rotation_deg"] <= 3.0 and abs(cam["fovy_delta_deg"]) <= 3.0
    scenes.apply("in_distribution", 0)


def _check_visible_and_cube_colour(task, scenes, defaults_cube, seeds):
    for seed in seeds:
        image, _ = _episode(task, scenes, "variant", seed)
        assert 60 < image.mean() < 235, (seed, image.mean())  # default: ~216 (eye in hand), ~220 (agentview)
        rgb, ref = _cube(task), defaults_cube[seed]
        assert np.abs(rgb - ref).max() < 35, (seed, rgb, ref)  # only the light differs
        assert rgb[0] > 2 * rgb[1] and rgb[0] > 2 * rgb[2]  # still the red cube


def test_cube_keeps_its_colour_and_scene_stays_visible(wrist):
    task, scenes, defaults = wrist
    _check_visible_and_cube_colour(task, scenes, {s: d[1] for s, d in defaults.items()}, SEEDS)
    scenes.apply("in_distribution", 0)


def test_agentview_too():
    task = make_task("lift", image_size=64, segmentation=True, camera="agentview")
    try:
        refs = {}
        for seed in SEEDS:
            task.reset(seed)
            refs[seed] = (_render(task), _cube(task))
        scenes = SceneVariants(task, "agentview")
        _check_visible_and_cube_colour(task, scenes, {s: r[1] for s, r in refs.items()}, SEEDS)
        image, info = _episode(task, scenes, "in_distribution", 0)
        assert np.array_equal(image, refs[0][0])
        assert info == {"split": "in_distribution", "seed": 0}
    finally:
        task.close()
