"""The lean request path reads raw events exactly as the full (polars) validation does.

Both paths are run on the same generated payloads: wherever the lean path answers, its token
sequence and seen set equal the full path's; where it declines (returns None), the payload is
one the full path either refuses or reads by a rule the lean path leaves to it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from fastapi import HTTPException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from behaviorlm.data.events import validate_events
from behaviorlm.errors import BehaviorLMError
from behaviorlm.recommender import BehaviorLM
from behaviorlm.service.api import validate_request_events
from behaviorlm.service.online import OnlineRecommender
from behaviorlm.service.request_events import RequestEncoder
from tests.conftest import make_events


@pytest.fixture(scope="module", params=["text ids", "integer ids"])
def model(request):
    raw = make_events(n_users=20, n_items=12, length=10)
    if request.param == "integer ids":
        raw = raw.with_columns(pl.col("item_id").str.strip_prefix("item").cast(pl.Int64))
    return BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=2, epochs=1, seed=0, progress=False).fit(
        validate_events(raw)
    )


def _full(model, online, events, schema):
    """The service's full path on the same payload (validate_request_events, as the API calls it)."""
    return online.query_for_events("u", validate_request_events(schema, "u", events))


item = st.one_of(
    st.sampled_from(["item1", "item3", " item4 ", "nope", "1", "3", " 5", "007", "1e1", "-2"]), st.integers(-3, 14)
)
action = st.sampled_from(["view", "View ", "pv", "cart", "purchase", "add_to_cart", "buy", "mystery"])
stamp = st.one_of(
    st.integers(1_700_000_000, 1_700_100_000),
    st.floats(1.7e12, 1.7001e12),
    st.sampled_from(
        [
            "2023-11-18T10:00:00Z",
            "2023-11-18 10:00:01",
            "2023-11-18T10:00:00.25+02:00",
            "2023-11-18",
            "2023-11-18T09:59",
            "2023-11-18T10:00Z",  # the file path refuses it: the lean path must not accept it
            "18/11/2023",
        ]
    ),
)
payload = st.lists(st.tuples(item, action, stamp), min_size=1, max_size=40)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=payload, policy=st.sampled_from(["raise", "drop", "keep"]))
def test_lean_path_equals_the_full_validation(model, events, policy):
    schema = replace(model.input_schema_.canonical(), unknown_actions=policy)
    online = OnlineRecommender.from_model(model)
    lean = RequestEncoder(model.engine.tokenizer, schema).encode("u", events)
    try:
        full = _full(model, online, events, schema)
    except (BehaviorLMError, HTTPException) as e:  # refused by the full path: the lean path must have declined
        assert lean is None, f"lean path accepted what the full path refuses: {e}"
        return
    # every time shape generated here that the full path reads, the lean path reads too
    assert lean is not None, f"lean path declined a payload the full path reads: {events}"
    np.testing.assert_array_equal(lean.items, full.items)
    np.testing.assert_array_equal(lean.actions, full.actions)
    np.testing.assert_array_equal(lean.gaps, full.gaps)
    np.testing.assert_array_equal(np.sort(lean.seen), np.sort(full.seen))


def test_lean_path_answers_numeric_payloads_and_long_unknown_ones(model):
    """The normal case (unix times) never falls back, 1,000 unknown items included."""
    enc = RequestEncoder(model.engine.tokenizer, model.input_schema_.canonical())
    events = [(f"unknown-{i}", "view", 1_700_000_000 + i) for i in range(1000)]
    out = enc.encode("u", events)
    assert out is not None and len(out.items) == model.engine.max_len and len(out.seen) == 0
    known = [("item1", "view", 1_700_000_000.5), ("item2", "purchase", 1_700_000_001.0)]
    assert enc.encode("u", known) is not None
