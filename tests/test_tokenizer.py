from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from behaviorlm.data.events import EventsError, validate_events
from behaviorlm.errors import NotFittedError
from behaviorlm.sequence.tokenizer import BOS, GAP_NONE, N_SPECIAL, UNK, ActionTokenizer
from tests.conftest import T0


def test_save_load_exact_round_trip(tmp_path, events):
    tok = ActionTokenizer(max_len=8, min_item_count=2).fit(events)
    tok.save(tmp_path / "tok.json")
    back = ActionTokenizer.load(tmp_path / "tok.json")
    assert back.to_dict() == tok.to_dict()
    a, b = tok.encode(events), back.encode(events)
    for f in ("offsets", "items", "actions", "gaps"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.user_ids == b.user_ids
    assert list(back.decode_items(a.items[a.items >= N_SPECIAL])) == list(
        tok.decode_items(a.items[a.items >= N_SPECIAL])
    )


def test_integer_ids_keep_their_type(tmp_path):
    ev = validate_events(
        pl.DataFrame(
            {
                "user_id": [1, 1],
                "item_id": [10, 20],
                "event_type": ["view"] * 2,
                "timestamp": [T0 + 1, T0 + 2],
            }
        )
    )
    tok = ActionTokenizer().fit(ev)
    tok.save(tmp_path / "t.json")
    back = ActionTokenizer.load(tmp_path / "t.json")
    assert back.items_ == [10, 20] and isinstance(back.items_[0], int)
    assert back.item_index(["10", 20, "nope"]).tolist() == [N_SPECIAL, N_SPECIAL + 1, UNK]


def test_unknown_and_rare_items_map_to_unk(events):
    tok = ActionTokenizer().fit(events)
    new = pl.DataFrame(
        {
            "user_id": ["x", "x"],
            "item_id": ["item0", "never-seen"],
            "event_type": ["view", "view"],
            "timestamp": [T0 + 1, T0 + 2],
        }
    )
    enc = tok.encode(validate_events(new))
    assert enc.items.tolist() == [BOS, tok.item_index(["item0"])[0], UNK]


def test_min_count_sends_rare_items_to_unk():
    ev = validate_events(
        pl.DataFrame(
            {
                "user_id": [1, 1, 1],
                "item_id": ["a", "a", "b"],
                "event_type": ["view"] * 3,
                "timestamp": [T0 + 1, T0 + 2, T0 + 3],
            }
        )
    )
    tok = ActionTokenizer(min_item_count=2).fit(ev)
    assert tok.items_ == ["a"]
    assert tok.encode(ev).items.tolist()[-1] == UNK


def test_truncation_keeps_most_recent_and_bos_only_at_true_start(events):
    tok = ActionTokenizer(max_len=5).fit(events)
    full = tok.encode(events, truncate=False)
    short = tok.encode(events)
    assert (short.lengths() == 5).all()
    items_full, _, _ = full.sequence(0)
    items_short, _, _ = short.sequence(0)
    np.testing.assert_array_equal(items_short, items_full[-5:])
    assert items_full[0] == BOS and BOS not in items_short


def test_time_gap_buckets_are_log_scale():
    tok = ActionTokenizer(n_time_buckets=10)
    b = tok.gap_bucket(np.array([np.nan, 0, 1, 2, 3, 1000, 1e12]))
    assert b.tolist() == [GAP_NONE, 2, 3, 3, 4, 2 + 9, 2 + 9]


def test_unknown_actions_strict(events):
    tok = ActionTokenizer().fit(events)
    with pytest.raises(EventsError, match="not seen in training"):
        tok.action_index(["teleport"])
    assert tok.action_index(["teleport"], strict=False).tolist() == [UNK]


def test_invalid_parameters():
    with pytest.raises(ValueError, match="max_len"):
        ActionTokenizer(max_len=1)
    raw = pl.DataFrame({"user_id": [1], "item_id": ["a"], "event_type": ["view"], "timestamp": [T0]})
    with pytest.raises(EventsError, match="min_item_count=10000"):
        ActionTokenizer(min_item_count=10_000).fit(validate_events(raw))
    with pytest.raises(NotFittedError, match="not fitted"):
        ActionTokenizer().encode(None)
    with pytest.raises(TypeError, match="expected validated Events"):  # inner layer: the boundary validates
        ActionTokenizer().fit(raw)
