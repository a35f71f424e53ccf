"""One sequence layout for every base (refinevla.sequences): which loss each target token feeds, where the marker
goes, and the padded arrays the training loop reads."""
import numpy as np
import pytest

from refinevla.sequences import ACTION, PREFIX, REASON, concat, join, pad

PROMPT, RATIONALE, ACTIONS, MARKER = [7, 8, 9], [20, 21], [30, 31, 32], 99


def test_rationale_before_the_actions_feeds_l_reasoning_up_to_and_including_the_marker():
    ids, types, part = join(PROMPT, RATIONALE, ACTIONS, "before", marker=MARKER)
    assert ids == PROMPT + RATIONALE + [MARKER] + ACTIONS
    assert types == [0, 0, 0] + [1] * 6  # causal over every target token (PaliGemma's prefix-LM mask)
    assert part == [PREFIX] * 3 + [REASON, REASON, REASON] + [ACTION] * 3


def test_without_a_rationale_the_marker_is_forced_and_has_no_loss():
    ids, types, part = join(PROMPT, [], ACTIONS, "before", marker=MARKER)
    assert ids == PROMPT + [MARKER] + ACTIONS
    assert part == [PREFIX] * 4 + [ACTION] * 3
    assert types == [0, 0, 0, 1, 1, 1, 1]


def test_rationale_after_the_actions_comes_last_and_the_marker_is_forced():
    ids, _, part = join(PROMPT, RATIONALE, ACTIONS, "after", marker=MARKER)
    assert ids == PROMPT + [MARKER] + ACTIONS + RATIONALE
    assert part == [PREFIX] * 4 + [ACTION] * 3 + [REASON] * 2


def test_a_base_without_a_marker_joins_rationale_and_actions_directly():
    assert join(PROMPT, RATIONALE, ACTIONS)[0] == PROMPT + RATIONALE + ACTIONS
    assert join(PROMPT, RATIONALE, ACTIONS, "after")[2] == [PREFIX] * 3 + [ACTION] * 3 + [REASON] * 2


def test_an_unknown_position_is_named():
    with pytest.raises(ValueError, match="'middle'"):
        join(PROMPT, RATIONALE, ACTIONS, "middle")


def test_pad_right_pads_and_masks_and_keeps_the_frame_count():
    seqs = [join(PROMPT, RATIONALE, ACTIONS, marker=MARKER), join(PROMPT, [], ACTIONS, marker=MARKER)]
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(2)]
    out = pad(seqs, images, pad_id=0, n_rows=1)
    assert out["input_ids"].shape == (2, 9) and out["n_rows"] == 1
    assert out["input_ids"][1].tolist() == PROMPT + [MARKER] + ACTIONS + [0, 0]
    assert out["attention_mask"][1].tolist() == [1] * 7 + [0, 0]
    assert out["part"][1, 7:].tolist() == [PREFIX, PREFIX] and out["token_type_ids"][1, 7:].tolist() == [1, 1]
    assert out["images"].shape == (2, 4, 4, 3) and out["images"][1].max() == 1
    assert pad(seqs, images, pad_id=0)["n_rows"] == 2


def test_concat_pads_every_set_to_the_longest_row_and_keeps_only_each_sets_frames():
    images = [np.zeros((2, 2, 3), np.uint8)] * 2
    long = pad([join(PROMPT, RATIONALE, ACTIONS, marker=MARKER)] * 2, images, pad_id=5, n_rows=1)
    short = pad([join(PROMPT, [], [], marker=MARKER)], images[:1], pad_id=5)
    out = concat(long, short, pad_id=5)
    assert out["n_rows"] == 2 and out["input_ids"].shape == (2, 9) and len(out["images"]) == 2
    assert out["input_ids"][1].tolist() == PROMPT + [MARKER] + [5] * 5
    assert out["attention_mask"][1].sum() == 4 and out["part"][1, 4:].tolist() == [PREFIX] * 5
