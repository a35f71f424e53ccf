"""Action / state bins and the locally trained tokenizer (refinevla.tokens).

    .venv/bin/pytest tests/test_tokens.py -q
"""
import numpy as np
import pytest

from refinevla.tokens import ACTION_MARKER, N_BINS, SPECIALS, BinStats, VLATokenizer


def random_actions(n=2000, seed=0):
    """7-D actions with very different scales and offsets per dimension, plus a few outliers."""
    rng = np.random.default_rng(seed)
    scale = np.array([0.02, 0.5, 3.0, 1e-3, 10.0, 0.3, 1.0])
    offset = np.array([0.0, -1.0, 5.0, 0.0, -20.0, 0.1, 0.5])
    x = rng.normal(size=(n, 7)) * scale + offset
    x[:5] += 50 * scale  # outliers the 1st/99th percentiles must ignore
    return x


# ------------------------------------------------------------------------------------------- bins
def test_fit_uses_1st_and_99th_percentiles_per_dimension():
    x = random_actions()
    stats = BinStats.fit(x)
    np.testing.assert_allclose(stats.low, np.quantile(x, 0.01, axis=0))
    np.testing.assert_allclose(stats.high, np.quantile(x, 0.99, axis=0))
    assert stats.n_bins == N_BINS == 256
    assert len(stats.low) == len(stats.high) == 7


def test_bins_are_256_uniform_cells():
    stats = BinStats(low=[-1.0, 0.0], high=[1.0, 10.0])
    np.testing.assert_allclose(stats.bin_width(), [2 / 256, 10 / 256])
    # the centre of cell i, encoded, is i; cell edges are uniformly spaced
    centres = stats.decode(np.stack([np.arange(256)] * 2, axis=1))
    np.testing.assert_array_equal(stats.encode(centres), np.stack([np.arange(256)] * 2, axis=1))
    np.testing.assert_allclose(np.diff(centres, axis=0), np.broadcast_to(stats.bin_width(), (255, 2)), rtol=1e-5)
    # a fine uniform sweep of the range fills every bin equally
    sweep = np.linspace(-1, 1, 256 * 40, endpoint=False)[:, None] * np.ones((1, 2)) * [1, 5] + [0, 5]
    counts = np.bincount(stats.encode(sweep)[:, 0], minlength=256)
    assert counts.min() == counts.max() == 40


def test_round_trip_error_is_at_most_half_a_bin_inside_the_range():
    x = random_actions(seed=1)
    stats = BinStats.fit(x)
    low, high = np.asarray(stats.low), np.asarray(stats.high)
    inside = x[np.all((x >= low) & (x <= high), axis=1)]
    assert len(inside) > 1000
    # add the range ends themselves: the worst cases of the clip at n_bins - 1
    inside = np.concatenate([inside, low[None], high[None]])
    bins = stats.encode(inside)
    assert bins.dtype == np.int64 and bins.min() >= 0 and bins.max() <= 255
    back = stats.decode(bins)
    assert back.dtype == np.float32
    err = np.abs(back.astype(np.float64) - inside)
    half = stats.bin_width() / 2
    tol = half * 1e-5 + 1e-6 * np.abs(inside).max(axis=0)  # float32 rounding of the decoded value
    assert np.all(err <= half + tol), (err / half).max(axis=0)


def test_out_of_range_values_clip_to_the_end_bins():
    stats = BinStats(low=[-1.0] * 7, high=[1.0] * 7)
    far = np.array([[-1e6, -1.0001, -5, 2, 1.0001, 1e6, np.inf]])
    bins = stats.encode(far)
    np.testing.assert_array_equal(bins, [[0, 0, 0, 255, 255, 255, 255]])
    centres = stats.decode(bins)
    np.testing.assert_allclose(centres[0, :3], -1 + 1 / 256, rtol=1e-6)
    np.testing.assert_allclose(centres[0, 3:], 1 - 1 / 256, rtol=1e-6)


def test_constant_dimension_gets_a_finite_range():
    x = random_actions()
    x[:, 3] = 0.25
    stats = BinStats.fit(x)
    assert stats.high[3] - stats.low[3] == pytest.approx(1.0)
    assert np.all(np.isfinite(stats.decode(stats.encode(x))))
    assert abs(stats.decode(stats.encode(x))[0, 3] - 0.25) <= stats.bin_width()[3] / 2 + 1e-6


@pytest.mark.parametrize("bad", [np.zeros((0, 7)), np.zeros(7), np.zeros((2, 3, 4))])
def test_fit_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="BinStats.fit"):
        BinStats.fit(bad)


# ----------------------------------------------------------------------------------- tokenizer
INSTRUCTIONS = ["pick up the red cube", "put the carrot on the plate"]
RATIONALES = ["observation : the cube is left . plan : move left then grasp",
              "observation : the carrot is near the plate . plan : lift , move right , release"]


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    return VLATokenizer.train_tiny(INSTRUCTIONS + RATIONALES, BinStats.fit(random_actions()),
                                   BinStats.fit(rng.uniform(-1, 1, (500, 8))))


@pytest.mark.parametrize("text", INSTRUCTIONS + RATIONALES)
def test_text_round_trip(tok, text):
    ids = tok.text_ids(text)
    assert len(ids) == len(text.split())
    assert tok.hf.unk_token_id not in ids
    assert tok.decode_text(ids) == text


def test_text_is_lower_cased_and_unknown_words_map_to_unk(tok):
    assert tok.text_ids("Pick UP the Red Cube") == tok.text_ids("pick up the red cube")
    assert tok.text_ids("pick up the zebra")[-1] == tok.hf.unk_token_id


def test_bin_tokens_are_distinct_from_text_and_special_tokens(tok):
    action, state = set(tok.action_ids.tolist()), set(tok.state_ids.tolist())
    assert len(action) == len(state) == N_BINS
    assert not action & state
    vocab = tok.hf.get_vocab()
    specials = {vocab[s] for s in SPECIALS}
    text = set(vocab.values()) - action - state - specials
    assert len(text) >= len(set(" ".join(INSTRUCTIONS + RATIONALES).split()))
    assert not (action | state) & (text | specials)
    assert {tok.marker_id, tok.image_id, tok.bos_id, tok.pad_id, *tok.sep_ids} <= specials
    assert tok.marker_id == vocab[ACTION_MARKER]
    # no text ever tokenises into a bin
    for t in INSTRUCTIONS + RATIONALES + ["act 001 st 255 < > action"]:
        assert not set(tok.text_ids(t)) & (action | state)
    assert tok.vocab_size == len(vocab) == len(text) + len(specials) + 2 * N_BINS


def test_action_ids_round_trip_to_bin_centres(tok):
    x = random_actions(50, seed=3)
    ids = [tok.action_to_ids(a) for a in x]
    assert all(set(i) <= set(tok.action_ids.tolist()) and len(i) == 7 for i in ids)
    back = np.stack([tok.ids_to_action(i) for i in ids])
    np.testing.assert_array_equal(back, tok.action_stats.decode(tok.action_stats.encode(x)))


def test_prompt_layout(tok):
    state = np.linspace(-0.9, 0.9, 8)
    ids = tok.prompt_ids("Pick up the RED cube", state, num_image_tokens=16)
    words = tok.text_ids("pick up the red cube")
    assert ids[:16] == [tok.image_id] * 16
    assert ids[16] == tok.bos_id
    assert ids[17:17 + len(words)] == words
    assert ids[17 + len(words):-len(tok.sep_ids)] == tok.state_to_ids(state)
    assert set(tok.state_to_ids(state)) <= set(tok.state_ids.tolist())
    assert ids[-len(tok.sep_ids):] == tok.sep_ids


def test_save_and_load_reproduce_statistics_and_ids_exactly(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "vla_tokens.json").exists()
    again = VLATokenizer.load(tmp_path)
    assert again.action_stats == tok.action_stats  # dataclass equality: every float identical
    assert again.state_stats == tok.state_stats
    np.testing.assert_array_equal(again.action_ids, tok.action_ids)
    np.testing.assert_array_equal(again.state_ids, tok.state_ids)
    assert (again.marker_id, again.image_id, again.bos_id, again.pad_id, again.sep_ids) == \
        (tok.marker_id, tok.image_id, tok.bos_id, tok.pad_id, tok.sep_ids)
    assert again.vocab_size == tok.vocab_size
    x = random_actions(100, seed=4)
    assert [again.action_to_ids(a) for a in x] == [tok.action_to_ids(a) for a in x]
    for text in INSTRUCTIONS + RATIONALES:
        assert again.text_ids(text) == tok.text_ids(text)
    state = np.full(8, 0.3)
    assert again.prompt_ids(INSTRUCTIONS[0], state, 4) == tok.prompt_ids(INSTRUCTIONS[0], state, 4)


def test_load_refuses_a_folder_without_vla_tokens(tmp_path):
    with pytest.raises(FileNotFoundError, match="vla_tokens.json"):
        VLATokenizer.load(tmp_path)


def test_an_angle_dimension_does_not_wrap_at_plus_minus_pi():
    """A gripper pointing down has roll ~ +-pi: a roll just past +pi must land next to one just below it, not at
    the other end of the range; values are wrapped around the fitted circular mean, and stats saved without the
    field bin as before."""
    rng = np.random.default_rng(0)
    roll = np.pi + rng.normal(0.0, 0.05, 2000)  # half of them past +pi: as measured, they read ~ -3.1
    measured = (roll + np.pi) % (2 * np.pi) - np.pi
    x = np.c_[measured, rng.uniform(-1, 1, 2000)]
    plain, wrapped = BinStats.fit(x), BinStats.fit(x, angles=[0])
    assert plain.high[0] - plain.low[0] > 6.0  # without wrapping the range spans nearly the whole turn
    assert wrapped.high[0] - wrapped.low[0] < 0.3 and wrapped.angles == [0]
    below, past = wrapped.encode(np.array([[np.pi - 0.01, 0.0], [-np.pi + 0.01, 0.0]]))[:, 0]
    apart = abs(int(below) - int(past)) * wrapped.bin_width()[0]  # as far apart as the angles are (0.02 rad)
    assert abs(apart - 0.02) <= wrapped.bin_width()[0]
    decoded = wrapped.decode(wrapped.encode(x))
    turn_error = np.abs((decoded[:, 0] - x[:, 0] + np.pi) % (2 * np.pi) - np.pi)  # modulo a whole turn
    assert np.quantile(turn_error, 0.98) <= wrapped.bin_width()[0] / 2 + 1e-5  # inside the range: half a bin (float32)
    np.testing.assert_array_equal(decoded[:, 1], plain.decode(plain.encode(x))[:, 1])  # other dims: as before
    saved = {k: v for k, v in vars(plain).items() if k != "angles"}  # a file written before the field existed
    assert BinStats(**saved) == plain and BinStats(**saved).angles == []
