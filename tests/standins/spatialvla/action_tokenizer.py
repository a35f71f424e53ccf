"""STAND-IN for SpatialVLA's spatial action tokenizer (``action_tokenizer.py`` of IPEC-COMMUNITY/spatialvla-4b-224-pt,
source: https://github.com/SpatialVLA/SpatialVLA/blob/main/model/action_tokenizer.py), re-written compactly.

One action (7 numbers, normalised to [-1, 1] except the gripper) becomes THREE tokens: the translation as one
token of a spherical (theta, phi, r) grid, the rotation as one token of a (roll, pitch, yaw) grid, the gripper as one
of two tokens (>= 0.5: token 1). Tokens are ``<ACTION00000>`` ..., translation first, then rotation, then gripper,
as in the original; decoding returns the bin centres (translation clipped to [-1, 1]). Only given or uniform bin
grids (``bin_policy``); the original can also derive them from Gaussian fits (``gs_params``).
"""
import numpy as np

ACTION_TOKEN = "<ACTION{:05d}>"


class _Grid3:
    """Three binned coordinates -> one token id (row-major), and back to the bin centres."""

    def __init__(self, tokenizer, bins: dict, names, begin: int):
        self.names, self.edges = names, [np.asarray(bins[n], np.float64) for n in names]
        self.sizes = [len(e) - 1 for e in self.edges]
        self._vocab_size = int(np.prod(self.sizes))
        self.token_array = np.array([ACTION_TOKEN.format(begin + i) for i in range(self._vocab_size)])
        tokenizer.add_tokens(self.token_array.tolist(), special_tokens=True)
        self.token_start_idx = tokenizer.convert_tokens_to_ids(self.token_array[0])
        self.token_end_idx = tokenizer.convert_tokens_to_ids(self.token_array[-1])

    def index(self, values):  # values [n, 3] -> flat bin index [n]
        idx = [np.clip(np.digitize(values[:, i], e[1:-1]), 0, s - 1)
               for i, (e, s) in enumerate(zip(self.edges, self.sizes))]
        return (idx[0] * self.sizes[1] + idx[1]) * self.sizes[2] + idx[2]

    def centres(self, token_ids):
        ids = np.clip(np.asarray(token_ids), self.token_start_idx, self.token_end_idx) - self.token_start_idx
        a, rest = ids // (self.sizes[1] * self.sizes[2]), ids % (self.sizes[1] * self.sizes[2])
        b, c = rest // self.sizes[2], rest % self.sizes[2]
        return np.stack([0.5 * (e[i] + e[i + 1]) for e, i in zip(self.edges, (a, b, c))], axis=1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


class SpatialActionTokenizer:
    range_bins = {
        "translation": {"theta_bins": (0.0, np.pi), "phi_bins": (-np.pi, np.pi), "r_bins": (0.0, np.sqrt(3))},
        "rotation": {"roll_bins": (-1.0, 1.0), "pitch_bins": (-1.0, 1.0), "yaw_bins": (-1.0, 1.0)},
    }

    def __init__(self, tokenizer, num_bins: dict, gs_params: dict = None, bin_policy: dict = None,
                 use_spherical: bool = True, min_sigma: float = 0.0, min_action: float = -1.0, max_action: float = 1.0):
        self.tokenizer, self.num_bins, self.use_spherical = tokenizer, num_bins, use_spherical
        self.min_action, self.max_action, self.min_sigma = min_action, max_action, min_sigma
        self.bin_policy = bin_policy or {kind: {k: np.linspace(*r, num_bins[kind][k] + 1).tolist()
                                                for k, r in ranges.items()}
                                         for kind, ranges in self.range_bins.items()}
        self.translation_tokenizer = _Grid3(tokenizer, self.bin_policy["translation"],
                                            ("theta_bins", "phi_bins", "r_bins"), 0)
        self.rotation_tokenizer = _Grid3(tokenizer, self.bin_policy["rotation"], ("roll_bins", "pitch_bins", "yaw_bins"),
                                         self.translation_tokenizer.vocab_size)
        begin = self.translation_tokenizer.vocab_size + self.rotation_tokenizer.vocab_size
        self.gripper_tokens = np.array([ACTION_TOKEN.format(begin + i) for i in range(num_bins["gripper"])])
        tokenizer.add_tokens(self.gripper_tokens.tolist(), special_tokens=True)
        self.gripper_start_idx = tokenizer.convert_tokens_to_ids(self.gripper_tokens[0])
        self._vocab_size = begin + num_bins["gripper"]

    def __call__(self, action: np.ndarray):
        """Normalised actions [n, 7] -> token strings [n, 3]."""
        action = np.asarray(action, np.float64).reshape(-1, 7)
        action = np.clip(action, self.min_action, self.max_action)
        x, y, z = action[:, 0], action[:, 1], action[:, 2]
        if self.use_spherical:
            trans = np.stack([np.arctan2(np.sqrt(x ** 2 + y ** 2), z), np.arctan2(y, x), np.sqrt(x ** 2 + y ** 2 + z ** 2)], 1)
        else:
            trans = action[:, :3]
        t = self.translation_tokenizer.token_array[self.translation_tokenizer.index(trans)]
        r = self.rotation_tokenizer.token_array[self.rotation_tokenizer.index(action[:, 3:6])]
        g = self.gripper_tokens[np.where(action[:, 6] >= 0.5, 1, 0)]
        return np.stack((t, r, g), axis=1)

    def decode_token_ids_to_actions(self, action_token_ids: np.ndarray) -> np.ndarray:
        """Token ids [n, 3] -> normalised actions [n, 7] (bin centres)."""
        ids = np.asarray(action_token_ids).reshape(-1, 3)
        theta, phi, r = self.translation_tokenizer.centres(ids[:, 0]).T
        if self.use_spherical:
            trans = np.stack([r * np.sin(theta) * np.cos(phi), r * np.sin(theta) * np.sin(phi), r * np.cos(theta)], 1)
        else:
            trans = np.stack([theta, phi, r], 1)
        rot = self.rotation_tokenizer.centres(ids[:, 1])
        grip = np.where(np.clip(ids[:, 2], self.gripper_start_idx, self.gripper_start_idx + 1) == self.gripper_start_idx,
                        0.0, 1.0)[:, None]
        return np.concatenate([np.clip(trans, -1, 1), rot, grip], axis=1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def action_token_begin_idx(self) -> int:
        return self.translation_tokenizer.token_start_idx
