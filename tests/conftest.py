"""Shared fixtures: small synthetic clickstreams with learnable structure."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from behaviorlm.events import validate_events


def make_events(n_users: int = 40, n_items: int = 12, length: int = 14, seed: int = 0) -> pl.DataFrame:
    """Each user walks the catalog cyclically (item i -> i+1) from a random start with the
    action cycle view, view, add_to_cart, purchase: next item and next action both follow from
    the content of the history, so a working model must beat popularity by a wide margin."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start, t = int(rng.integers(n_items)), 1_700_000_000 + int(rng.integers(10_000))
        for j in range(length):
            action = ("view", "view", "add_to_cart", "purchase")[(j + start) % 4]
            rows.append((u, f"item{(start + j) % n_items}", action, t))
            t += int(rng.integers(30, 4000))
    return pl.DataFrame(rows, schema=["user_id", "item_id", "event_type", "timestamp"], orient="row")


@pytest.fixture
def raw_events() -> pl.DataFrame:
    return make_events()


@pytest.fixture
def events(raw_events):
    return validate_events(raw_events)
