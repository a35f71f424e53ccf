"""Scene splits for the generalisation study, after SimplerEnv's "visual matching" vs "variant aggregation".

``in_distribution`` episodes show the default (training) scene; ``variant`` episodes show a scene drawn from the
episode seed: other arena textures (table / bins, floor, walls), other lighting and a slightly moved policy camera.
The task objects are never touched (instructions name their colours). All edits are made by robosuite's own modders
(``robosuite.utils.mjmod``); :class:`SceneVariants` only picks what they may touch and how far::

    task = make_task("lift", camera="robot0_eye_in_hand")
    scenes = SceneVariants(task, task.camera)     # once per env, on the default scene
    task.reset(seed)
    info = scenes.apply("variant", seed)          # right after the reset: same seed -> same scene
    obs = task.observe()                          # render *after* apply

``apply`` first restores the defaults, so an in-distribution episode after a variant one is pixel-identical to a
fresh default scene. Cost per apply (64 px, 2-core CPU; one step + render is ~12 ms): variant ~65 ms (lift, stack;
~30 ms pick_place_can), in_distribution ~35 ms right after a variant (textures re-uploaded) and ~0.15 ms otherwise.
Textures dominate: uploading the 1181 px table texture alone takes ~30 ms.
"""
from __future__ import annotations

import functools

import numpy as np

from .schema import SPLITS
_SALT = 0x5CE4E  # the scene draw must not reuse the placement draw of the same seed (sim.SimTask._reseed)
_TEXROLE_RGB = 1  # mujoco.mjtTextureRole.mjTEXROLE_RGB
_TEXTURE = dict(randomize_local=True, local_rgb_interpolation=0.5, randomize_material=True,
                local_material_interpolation=0.3)  # a 50/50 blend with a random pattern: new, never garish
_LIGHT = dict(randomize_active=False, position_perturbation_size=0.3, direction_perturbation_size=0.35,  # 20 deg
              specular_perturbation_size=0.1, ambient_perturbation_size=0.1, diffuse_perturbation_size=0.2)
_CAMERA = dict(position_perturbation_size=0.01, rotation_perturbation_size=0.052,  # 1 cm per axis, 3 deg
               fovy_perturbation_size=3.0)
_DESCRIPTIONS = {
    "in_distribution": "The default scene of the training demonstrations: same table, floor, walls, lighting "
                       "and camera (SimplerEnv's visual matching).",
    "variant": "A scene never seen in training, drawn from the episode seed: other table, floor and wall textures, "
               "other lighting and a policy camera moved by up to 1 cm per axis, turned by up to 3 degrees and "
               "zoomed by up to 3 degrees of field of view "
               "(SimplerEnv's variant aggregation); the task objects keep their look.",
}


def randomized(i: int, share: float) -> bool:
    """Whether item ``i`` of a sequence is shown in a randomized scene, for a deterministic ``share`` of the items
    spread evenly (0.5: every second one). The pre-training of the tiny base uses it (frames and episodes on their
    own seeds, so never an evaluation scene)."""
    return int((i + 1) * share) > int(i * share)


def _check(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed splits: {list(SPLITS)}")


def describe_split(split: str) -> str:
    """One sentence on what ``split`` shows, for the book."""
    _check(split)
    return _DESCRIPTIONS[split]


class _Model31:
    """The model as robosuite's TextureModder expects it (MuJoCo 3.1): ``tex_rgb`` (since 3.2 ``tex_data``),
    one texture per material (since 3.2 a column per texture role), and geoms addressable by id as well as by name
    (the bins of PickPlace have no names)."""

    def __init__(self, model):
        self._m = model

    def __getattr__(self, key):
        return getattr(self._m, key)

    @property
    def tex_rgb(self):
        return self._m._model.tex_data

    @property
    def mat_texid(self):
        return self._m._model.mat_texid[:, _TEXROLE_RGB]

    def geom_name2id(self, name):
        return int(name) if isinstance(name, (int, np.integer)) else self._m.geom_name2id(name)


@functools.cache
def _texture_modder_class():
    from robosuite.utils.mjmod import TextureModder

    class ArenaTextureModder(TextureModder):
        """robosuite's TextureModder for MuJoCo 3.3 and a render context of our own, restoring what it whitens."""

        def __init__(self, sim, geoms, **kw):
            self._view, self.choices = _Model31(sim.model), {}
            super().__init__(sim, geom_names=list(geoms), randomize_skybox=False, **kw)

        @property
        def model(self):
            return self._view

        def _tex_ids(self):
            return {self._name_to_tex_id(g) for g in self.geom_names if self._check_geom_for_texture(g)}

        def _cache_checker_matrices(self):  # only the textures we touch, as uint8: ~100 MB less than stock
            self._texture_checker_mats = {
                t: tuple(c.astype(np.uint8) for c in self._make_checker_matrices(*self.textures[t].bitmap.shape[:2]))
                for t in self._tex_ids()}

        def save_defaults(self):
            super().save_defaults()  # whiten_materials() changes geom and material rgba; stock restore does not undo it
            gids = [self.model.geom_name2id(g) for g in self.geom_names]
            self._gids, self._mids = gids, [m for m in self.model.geom_matid[gids] if m >= 0]
            self._rgba = self.model.geom_rgba[gids].copy(), self.model.mat_rgba[self._mids].copy()

        def restore_defaults(self):
            super().restore_defaults()
            self.model.geom_rgba[self._gids], self.model.mat_rgba[self._mids] = self._rgba

        def set_texture(self, name, bitmap, perturb=False):  # the stock blend in 8-bit fixed point: ~5x faster
            if perturb:
                k = round(256 * self.local_rgb_interpolation)
                default = self._defaults[name]["texture"].astype(np.uint16)
                bitmap = ((256 - k) * default + k * np.asarray(bitmap, np.uint16)) >> 8
            super().set_texture(name, bitmap, perturb=False)

        def _randomize_texture(self, name):  # the stock draw, remembering the variation for the description
            keys = list(self._texture_variation_callbacks)
            self.choices[name] = keys[self.random_state.randint(len(keys))]
            self._texture_variation_callbacks[self.choices[name]](name)

        def upload_texture(self, name, device_id=0):
            # stock: a no-op when the sim has a context, and a new context (replacing ours) when it has none
            ctx = getattr(self.sim, "_render_context_offscreen", None)
            if ctx is not None:
                ctx.upload_texture(self.get_texture(name).id)

    return ArenaTextureModder


def arena_geoms(env) -> list[int]:
    """Visible geoms of the arena, one per texture (six walls share one): visual group 1, not in the subtree of a
    robot or a task object, sharing no material or texture with a task object; table and bin legs are left out."""
    sim = env.sim
    m = sim.model._model
    roots = {sim.model.body_name2id(r.robot_model.root_body) for r in env.robots}
    roots |= {sim.model.body_name2id(o.root_body) for o in getattr(env.model, "mujoco_objects", []) or []}
    owner = np.isin(m.body_rootid[m.geom_bodyid], sorted(roots))
    tex = np.where(m.geom_matid >= 0, m.mat_texid[m.geom_matid, _TEXROLE_RGB], -1)
    taken_mat, taken_tex = set(m.geom_matid[owner]) - {-1}, set(tex[owner]) - {-1}
    chosen, seen = [], set()
    for g in np.flatnonzero((m.geom_group == 1) & ~owner):
        t = int(tex[g])
        if (m.geom_matid[g] in taken_mat or t in taken_tex or t in seen or (t >= 0 and m.tex_nchannel[t] != 3)
                or "leg" in (m.geom(g).name or "")):  # legs: out of view, and 10 ms of texture upload
            continue
        if t >= 0:
            seen.add(t)
        chosen.append(int(g))
    return chosen


class SceneVariants:
    """The two splits of one env: ``apply(split, seed)`` after each reset (see the module docstring)."""

    def __init__(self, sim_task_or_env, camera: str):
        from robosuite.utils.mjmod import CameraModder, LightingModder

        self.env = getattr(sim_task_or_env, "env", sim_task_or_env)
        self.sim, self.camera = self.env.sim, camera
        self.sim.model.camera_name2id(camera)  # fail fast on an unknown camera
        self.geoms = arena_geoms(self.env)
        self.texture = _texture_modder_class()(self.sim, self.geoms, **_TEXTURE)
        self.light = LightingModder(self.sim, **_LIGHT)
        self.cam = CameraModder(self.sim, camera_names=[camera], **_CAMERA)
        self._textures_dirty = False

    def apply(self, split: str, seed: int) -> dict:
        """Restore the default scene, then for "variant" draw textures, lighting and camera from ``seed``. Returns
        what was changed (JSON-able)."""
        _check(split)
        ctx = getattr(self.sim, "_render_context_offscreen", None)
        if ctx is not None:  # SimTask.render does not select its GL context; uploads and renders must hit ours
            ctx.gl_ctx.make_current()
        self.light.restore_defaults()
        self.cam.restore_defaults()
        if self._textures_dirty and split != "variant":  # a variant overwrites them all; uploads cost ~35 ms
            self.texture.restore_defaults()
            self._textures_dirty = False
        info = {"split": split, "seed": int(seed)}
        if split == "variant":
            rs = np.random.RandomState(np.random.default_rng([int(seed), _SALT]).bit_generator)
            self.texture.choices.clear()
            for modder in (self.texture, self.light, self.cam):
                modder.random_state = rs
                modder.randomize()
            for name in self.light.light_names:  # keep the light physical: colours in [0, 1]
                for get, put in ((self.light.get_ambient, self.light.set_ambient),
                                 (self.light.get_diffuse, self.light.set_diffuse),
                                 (self.light.get_specular, self.light.set_specular)):
                    put(name, np.clip(get(name), 0.0, 1.0))
            self._textures_dirty = True
            info.update(self._describe())
        self.sim.forward()  # camera and light poses reach the renderer through mj_forward
        return info

    def _describe(self) -> dict:
        tex_ids = {g: self.texture._name_to_tex_id(g) for g in self.texture.choices}
        textures = {self.sim.model._model.texture(t).name or f"texture{t}": self.texture.choices[g]
                    for g, t in tex_ids.items()}
        d = self.cam._defaults[self.camera]
        q0, q1 = d["quat"], self.cam.get_quat(self.camera)
        rot = 2 * np.degrees(np.arccos(np.clip(abs(float(np.dot(q0, q1))), 0.0, 1.0)))
        lights = [{k: [round(float(x), 3) for x in getter(n)] for k, getter in
                   (("dir", self.light.get_dir), ("diffuse", self.light.get_diffuse),
                    ("ambient", self.light.get_ambient))} for n in self.light.light_names]
        return {"textures": textures, "lights": lights,
                "camera": {"name": self.camera,
                           "shift_mm": round(1000 * float(np.linalg.norm(self.cam.get_pos(self.camera) - d["pos"])), 2),
                           "rotation_deg": round(rot, 2),
                           "fovy_delta_deg": round(float(self.cam.get_fovy(self.camera) - d["fovy"]), 2)}}
