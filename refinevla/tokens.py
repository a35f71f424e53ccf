"""Tokens: action / state bins and the text tokenizer, for the tiny model and for real checkpoints.

Actions follow OpenVLA: each dimension is normalised with the dataset's 1st/99th percentiles to [-1, 1],
cut into uniform bins, and each bin is one reserved vocabulary token. Actions use an odd number of bins
(255 of the 256 reserved tokens), so that the middle of a symmetric range, a zero command, is the centre of a
bin and decodes to exactly zero (with 256 bins zero sits on a bin edge and decodes to +1/256 of the range,
a drift of several degrees per axis over an episode). The proprioceptive state is discretised the same way
(its own statistics, its own 256 tokens) and written into the prompt.

A frame's action target can be a chunk of the next ``action_chunk`` actions (SpatialVLA predicts chunks of
4): ``7 * action_chunk`` bin tokens, executed one control step at a time before the policy decodes again.

The tiny scale trains a word-level tokenizer on the instructions and rationales of the run and appends the
special and bin tokens; a real PaliGemma checkpoint reuses its ``<locNNNN>`` tokens as bins.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

N_BINS = 256          # reserved tokens per kind (actions, state)
ACTION_BINS = 255     # odd: zero is a bin centre
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<sep>", "<image>", "ACTION:"]
ACTION_MARKER = "ACTION:"


# --------------------------------------------------------------------------------------------- bins
@dataclass
class BinStats:
    """Per-dimension normalisation range (q01, q99) and the number of bins; saved with every checkpoint.

    ``angles``: dimensions that are angles in radians. Each is wrapped into the turn centred on its range
    (``(low + high) / 2 +- pi``) before it is binned, so a roll just past +pi lands next to one just below it
    instead of at the other end of the range (a gripper pointing down has roll ~ +-pi)."""

    low: list[float]
    high: list[float]
    n_bins: int = N_BINS
    angles: list[int] = field(default_factory=list)

    @classmethod
    def fit(cls, values: np.ndarray, q: float = 0.01, n_bins: int = N_BINS, symmetric=(), angles=()) -> "BinStats":
        """Percentile range of ``values`` [N, D]; a constant dimension gets a unit-wide range around it.
        Dimensions in ``symmetric`` get the range [-m, m] (m the larger end): with an odd ``n_bins``, zero is then
        the centre of the middle bin (deltas: "do not move" decodes to exactly 0). Dimensions in ``angles`` are
        first wrapped into the turn centred on their circular mean."""
        values = np.array(values, np.float64)
        if values.ndim != 2 or len(values) == 0:
            raise ValueError(f"BinStats.fit needs a non-empty [N, D] array, got shape {values.shape}")
        for d in angles:
            centre = np.arctan2(np.sin(values[:, d]).mean(), np.cos(values[:, d]).mean())
            values[:, d] = _wrap(values[:, d], centre)
        low, high = np.quantile(values, q, axis=0), np.quantile(values, 1 - q, axis=0)
        for d in symmetric:
            m = max(abs(low[d]), abs(high[d]))
            low[d], high[d] = -m, m
        flat = (high - low) < 1e-6
        low, high = np.where(flat, low - 0.5, low), np.where(flat, high + 0.5, high)
        return cls(low=low.tolist(), high=high.tolist(), n_bins=n_bins, angles=[int(d) for d in angles])

    def to_dict(self) -> dict:
        """As saved (vla_tokens.json): ``angles`` only when there are some, so files without them read the same."""
        d = asdict(self)
        return d if d["angles"] else {k: v for k, v in d.items() if k != "angles"}

    def _unwrapped(self, x) -> np.ndarray:
        x = np.array(x, np.float64)
        for d in self.angles:
            x[..., d] = _wrap(x[..., d], (self.low[d] + self.high[d]) / 2)
        return x

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Continuous values [..., D] -> bin indices in [0, n_bins) (values outside the range are clipped)."""
        low, high = np.asarray(self.low), np.asarray(self.high)
        unit = (self._unwrapped(x) - low) / (high - low)  # [0, 1] inside the range
        return np.clip(np.floor(unit * self.n_bins), 0, self.n_bins - 1).astype(np.int64)

    def decode(self, bins: np.ndarray) -> np.ndarray:
        """Bin indices -> the centre of each bin in the original units (float32; an angle within its range's turn)."""
        low, high = np.asarray(self.low), np.asarray(self.high)
        unit = (np.asarray(bins, np.float64) + 0.5) / self.n_bins
        return (low + unit * (high - low)).astype(np.float32)

    def bin_width(self) -> np.ndarray:
        return (np.asarray(self.high) - np.asarray(self.low)) / self.n_bins


def _wrap(angle, centre) -> np.ndarray:
    """``angle`` (radians) moved by whole turns into [centre - pi, centre + pi)."""
    return (np.asarray(angle, np.float64) - centre + np.pi) % (2 * np.pi) - np.pi + centre


# ------------------------------------------------------------------------------------ tokenizer
class VLATokenizer:
    """Text tokenizer + the ids of the image, marker and bin tokens + the action / state statistics.

    One object serves both scales: ``train_tiny`` builds a word-level vocabulary from the run's text,
    ``from_pretrained_checkpoint`` wraps a real PaliGemma tokenizer and maps bins to its ``<locNNNN>`` tokens.
    """

    def __init__(self, hf_tokenizer, action_ids, state_ids, marker_id, image_id, bos_id, sep_ids,
                 pad_id, action_stats: BinStats, state_stats: BinStats, action_chunk: int = 1):
        self.hf = hf_tokenizer
        self.action_ids = np.asarray(action_ids, np.int64)
        self.state_ids = np.asarray(state_ids, np.int64)
        self.marker_id, self.image_id, self.bos_id, self.pad_id = marker_id, image_id, bos_id, pad_id
        self.sep_ids = list(sep_ids)
        self.action_stats, self.state_stats = action_stats, state_stats
        self.action_chunk = int(action_chunk)
        self._bin_of_action_id = {int(t): i for i, t in enumerate(self.action_ids)}

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    # -- text
    def text_ids(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode_text(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True).strip()

    # -- bins
    def action_to_ids(self, action: np.ndarray) -> list[int]:
        """float[7] or a chunk float[k, 7] -> 7 or 7k bin tokens (row by row)."""
        return self.action_ids[self.action_stats.encode(action)].reshape(-1).tolist()

    @property
    def action_tokens(self) -> int:
        """Action tokens per decoded frame: 7 per action of the chunk."""
        return 7 * self.action_chunk

    def ids_to_bins(self, ids) -> np.ndarray:
        """The bin index (0..n_bins-1) of each action token."""
        return np.array([self._bin_of_action_id[int(t)] for t in ids])

    def ids_to_action(self, ids) -> np.ndarray:
        return self.action_stats.decode(self.ids_to_bins(ids))

    def ids_to_actions(self, ids) -> np.ndarray:
        """7k action tokens -> float32[k, 7], the chunk in execution order."""
        return self.action_stats.decode(self.ids_to_bins(ids).reshape(-1, len(self.action_stats.low)))

    def state_to_ids(self, state: np.ndarray) -> list[int]:
        return self.state_ids[self.state_stats.encode(state)].tolist()

    # -- the prompt: <image> x N, <bos>, instruction, state bins, <sep>
    def prompt_ids(self, instruction: str, state: np.ndarray, num_image_tokens: int) -> list[int]:
        return ([self.image_id] * num_image_tokens + [self.bos_id] + self.text_ids(instruction.lower())
                + self.state_to_ids(state) + self.sep_ids)

    # -- persistence (tokenizer.json + bins.json: plain text, nothing unpickled)
    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        self.hf.save_pretrained(out_dir)
        meta = dict(action_ids=self.action_ids.tolist(), state_ids=self.state_ids.tolist(),
                    marker_id=self.marker_id, image_id=self.image_id, bos_id=self.bos_id,
                    sep_ids=self.sep_ids, pad_id=self.pad_id, action_chunk=self.action_chunk,
                    action_stats=self.action_stats.to_dict(), state_stats=self.state_stats.to_dict())
        (out_dir / "vla_tokens.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "VLATokenizer":
        from transformers import AutoTokenizer

        path = Path(path)
        meta_file = path / "vla_tokens.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{meta_file} not found: not a refinevla checkpoint folder")
        meta = json.loads(meta_file.read_text())
        hf = AutoTokenizer.from_pretrained(path)
        return cls(hf, meta["action_ids"], meta["state_ids"], meta["marker_id"], meta["image_id"],
                   meta["bos_id"], meta["sep_ids"], meta["pad_id"],
                   BinStats(**meta["action_stats"]), BinStats(**meta["state_stats"]), meta.get("action_chunk", 1))

    # -- builders
    @classmethod
    def train_tiny(cls, texts, action_stats: BinStats, state_stats: BinStats,
                   min_frequency: int = 1, action_chunk: int = 1) -> "VLATokenizer":
        """A lower-case word-level tokenizer over ``texts`` + specials + 256 action and 256 state tokens."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
        trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=min_frequency)
        tok.train_from_iterator(texts, trainer=trainer)
        action_tokens = [f"<act_{i:03d}>" for i in range(N_BINS)]
        state_tokens = [f"<st_{i:03d}>" for i in range(N_BINS)]
        tok.add_special_tokens(action_tokens + state_tokens)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                     bos_token="<bos>", eos_token="<eos>")
        ids = hf.convert_tokens_to_ids
        return cls(hf, ids(action_tokens), ids(state_tokens), ids(ACTION_MARKER), ids("<image>"),
                   ids("<bos>"), [ids("<sep>")], ids("<pad>"), action_stats, state_stats, action_chunk)

    @classmethod
    def from_pretrained_checkpoint(cls, checkpoint: str, action_stats: BinStats,
                                   state_stats: BinStats, action_chunk: int = 1) -> "VLATokenizer":
        """Wrap a real PaliGemma tokenizer: bins are ``<loc0000..0255>`` (actions), ``<loc0256..0511>``
        (state); the marker is the plain-text "ACTION:" (its first sub-token starts the action part)."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(checkpoint)
        loc = [hf.convert_tokens_to_ids(f"<loc{i:04d}>") for i in range(2 * N_BINS)]
        if any(t is None or t == hf.unk_token_id for t in loc):
            raise ValueError(f"{checkpoint}: tokenizer has no <locNNNN> tokens; cannot place action bins")
        marker = hf(" " + ACTION_MARKER, add_special_tokens=False)["input_ids"]
        if len(marker) != 1:  # use a single reserved token so the action part starts at one known id
            hf.add_special_tokens({"additional_special_tokens": [ACTION_MARKER]})
            marker = [hf.convert_tokens_to_ids(ACTION_MARKER)]
        image_id = hf.convert_tokens_to_ids("<image>")
        sep = hf("\n", add_special_tokens=False)["input_ids"]
        return cls(hf, loc[:N_BINS], loc[N_BINS:], marker[0], image_id, hf.bos_token_id, sep,
                   hf.pad_token_id, action_stats, state_stats, action_chunk)
