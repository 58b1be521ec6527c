"""Side features in the tokenizer and the model: per-event value buckets (amount, quantity) and
item side features (category, brand) -- learned, saved with the model, unknowns mapped to UNK."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from behaviorlm.data.events import ColumnMapping, EventsError, validate_events
from behaviorlm.nn.model import BehaviorTransformer, ModelConfig
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.tokenizer import N_SPECIAL, SIDE_NONE, SIDE_UNK, ActionTokenizer


def shop(n_users: int = 30, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        t = 1_700_000_000 + int(rng.integers(0, 1000))
        for _ in range(int(rng.integers(4, 12))):
            item = int(rng.integers(20))
            amount = None if rng.random() < 0.2 else float(rng.uniform(1, 100))
            rows.append((u, item, str(rng.choice(["view", "purchase"])), t, amount, float(rng.integers(1, 4))))
            t += int(rng.integers(60, 5000))
    events = pl.DataFrame(
        rows, schema=["user_id", "item_id", "event_type", "timestamp", "amount", "quantity"], orient="row"
    )
    items = pl.DataFrame(
        {
            "item_id": list(range(20)),
            "category": [f"c{i % 4}" for i in range(18)] + [None, None],
            "brand": [f"b{i % 3}" for i in range(20)],
        }
    )
    return events, items


@pytest.fixture
def data():
    raw, items = shop()
    return validate_events(raw, ColumnMapping(amount="amount", quantity="quantity")), items


def test_vocabularies_round_trip_and_unknowns_are_unk(data, tmp_path):
    ev, items = data
    tok = ActionTokenizer(value_buckets=4, side_columns=("category", "brand")).fit(ev, items)
    assert tok.side_sizes == (6, 5)  # 4 categories / 3 brands + none + unknown
    assert set(tok.value_edges_) == {"amount", "quantity"} and len(tok.value_edges_["amount"]) == 3
    assert (tok.item_sides_[:N_SPECIAL] == SIDE_NONE).all()
    no_category = [tok.items_.index(i) + N_SPECIAL for i in (18, 19) if i in tok.items_]
    assert no_category and (tok.item_sides_[no_category, 0] == SIDE_UNK).all()  # null category -> UNK
    tok.save(tmp_path / "tok.json")
    back = ActionTokenizer.load(tmp_path / "tok.json")
    assert back.side_vocab_ == tok.side_vocab_ and back.value_edges_ == tok.value_edges_
    np.testing.assert_array_equal(back.item_sides_, tok.item_sides_)
    a, b = tok.encode(ev), back.encode(ev)
    np.testing.assert_array_equal(a.gaps, b.gaps)
    assert a.gaps.max() >= tok.n_gaps  # values are packed above the gap buckets
    # a new day's items: their side features are unknown until an item table says otherwise
    new = validate_events(
        pl.DataFrame({"user_id": [1], "item_id": [99], "event_type": ["view"], "timestamp": [1.75e9]})
    )
    grown = tok.extended(new)
    assert grown.item_sides_.shape == (grown.n_items, 2) and (grown.item_sides_[-1] == SIDE_UNK).all()


def test_unknown_value_is_bucket_zero(data):
    ev, items = data
    tok = ActionTokenizer(value_buckets=4).fit(ev)
    ids = tok.value_ids(ev.df)
    amount_part = ids % tok.value_sizes[0]
    assert (amount_part[ev.df["amount"].is_null().to_numpy()] == 0).all()
    assert (amount_part[ev.df["amount"].is_not_null().to_numpy()] >= 1).all()
    assert (tok.value_ids(ev.df.drop("amount", "quantity")) == 0).all()  # events without values


def test_model_unpacks_context_ids_and_adds_item_sides():
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=10, n_actions=6, n_gaps=5, max_len=8, dim=8, value_sizes=(3, 2), side_sizes=(4,))
    m = BehaviorTransformer(cfg).eval()
    m.set_item_sides(torch.tensor([[0]] * 4 + [[2], [3], [1], [2], [3], [1]]))
    gap, v0, v1 = 3, 2, 1
    ctx = torch.tensor([gap + 5 * (v0 + 3 * v1)])
    want = m.gap_emb.weight[gap] + m.value_embs[0].weight[v0] + m.value_embs[1].weight[v1]
    torch.testing.assert_close(m.context_vectors(ctx)[0], want)
    torch.testing.assert_close(m.item_vectors(torch.tensor([5]))[0], m.item_emb.weight[5] + m.side_embs[0].weight[3])
    with torch.no_grad():
        torch.testing.assert_close(m.item_matrix()[5], m.item_vectors(torch.tensor([5]))[0])
        before = m.item_matrix().clone()
        m.side_embs[0].weight.add_(1.0)
        m.eval()  # edited in place: eval() again refreshes the cached matrix
        assert not torch.allclose(m.item_matrix()[5], before[5])


def test_estimator_trains_saves_and_reloads_with_side_features(data, tmp_path):
    ev, items = data
    kw = {"epochs": 2, "dim": 16, "n_layers": 1, "n_heads": 1, "max_len": 16, "progress": False}
    m = BehaviorLM("quick", value_buckets=4, side_features=("category",), **kw).fit(ev, items=items)
    assert m.model_.config.side_sizes == (6,) and m.model_.config.value_sizes == (5, 5)
    m.save(tmp_path / "m")
    back = BehaviorLM.load(tmp_path / "m")
    np.testing.assert_array_equal(back.tokenizer_.item_sides_, m.tokenizer_.item_sides_)
    a, b = m.recommend(events=ev, k=5), back.recommend(events=ev, k=5)
    assert a.equals(b)


def test_side_features_need_the_columns(data):
    ev, items = data
    with pytest.raises(EventsError, match=r"side features \['colour'\] need an item table"):
        ActionTokenizer(side_columns=("colour",)).fit(ev, items)
    with pytest.raises(EventsError, match="need an item table"):
        BehaviorLM("quick", side_features=("category",), epochs=1, progress=False).fit(ev)


def test_the_onnx_graph_carries_side_features(data, tmp_path):
    pytest.importorskip("onnxruntime")
    from behaviorlm.inference.onnx_engine import compare

    ev, items = data
    kw = {"epochs": 1, "dim": 16, "n_layers": 1, "n_heads": 1, "max_len": 16, "progress": False}
    m = BehaviorLM("quick", value_buckets=4, side_features=("category",), **kw).fit(ev, items=items)
    m.save(tmp_path / "m")
    torch_engine = m.engine
    m.use_engine("onnx", tmp_path / "m")
    diff = compare(torch_engine, m.engine, torch_engine.encode(ev), slice(0, 20))
    assert max(diff.values()) < 1e-4, diff


def test_amounts_reach_the_propensity_inputs(data):
    from behaviorlm.propensity.labels import cutoff_examples
    from behaviorlm.propensity.scorers import encode_examples

    ev, _ = data
    tok = ActionTokenizer(value_buckets=4).fit(ev)
    ex = cutoff_examples(ev, ev.end, "1d")
    enc = encode_examples(tok, ex, max_len=64, query=False)
    assert (enc.gaps >= tok.n_gaps).any()  # value buckets packed above the gap ids
    bare = cutoff_examples(validate_events(ev.df.drop("amount", "quantity")), ev.end, "1d")
    assert not np.array_equal(encode_examples(tok, bare, max_len=64, query=False).gaps, enc.gaps)
