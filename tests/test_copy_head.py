"""The repeat-aware model: a proper mixture, copy mass only on the user's own context, nothing
from the future, and the same top-10 through every path of the engine."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from behaviorlm.data.events import validate_events
from behaviorlm.inference.batch import ScoringOptions, score_events
from behaviorlm.inference.retrieval import IndexParams
from behaviorlm.nn.copy_head import recency_bucket
from behaviorlm.nn.model import BehaviorTransformer, ModelConfig
from behaviorlm.nn.training import TrainConfig, sequence_loss
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.tokenizer import N_SPECIAL
from tests.conftest import make_events


@pytest.fixture(scope="module")
def events():
    return validate_events(make_events(n_users=50, n_items=60, length=24, seed=5))


@pytest.fixture(scope="module")
def model(events):
    m = BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=2, epochs=3, copy_head=True, seed=0, progress=False)
    m.fit(events)
    m.model_.copy_head.gate_shift.fill_(0.7)  # an arbitrary calibrated shift: every path must honour it
    return m


def _net(n_items: int = 30, max_len: int = 12, since: bool = False) -> BehaviorTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items, 6, 10, max_len=max_len, dim=16, n_heads=2, copy_head=True, copy_since=since)
    net = BehaviorTransformer(cfg).eval()
    if since:  # trained values, so that the "touched again since" term is not trivially zero
        with torch.no_grad():
            net.copy_head.since_bias.copy_(torch.linspace(-2.0, 3.0, 6))
    return net


def _batch(net: BehaviorTransformer, length: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(N_SPECIAL, net.config.n_items, (3, length), generator=g)
    items[:, :3] = items[:, 3:6]  # repeats, so copy mass adds up over positions
    items[0, 0] = 1  # BOS: never copied
    actions = torch.randint(N_SPECIAL, net.config.n_actions, (3, length), generator=g)
    gaps = torch.randint(1, net.config.n_gaps, (3, length), generator=g)
    return items, actions, gaps


@pytest.mark.parametrize("since", [False, True])
def test_mixture_is_a_distribution_per_position_and_action(since):
    net = _net(since=since)
    items, actions, gaps = _batch(net, 10)
    state = net(items, actions, gaps, last=torch.tensor([9, 5, 0]))
    for a in range(N_SPECIAL, net.config.n_actions):
        p = net.item_logp(state, torch.full((3,), a)).exp()
        torch.testing.assert_close(p.sum(1), torch.ones(3), atol=1e-5, rtol=0)
        assert (p[:, :N_SPECIAL] == 0).all()


def test_copy_mass_stays_on_the_context_window_up_to_the_scoring_position():
    net = _net()
    items, actions, gaps = _batch(net, 10)
    last = torch.tensor([9, 5, 2])
    state = net(items, actions, gaps, last=last)
    copy = net.state_layout.copy_logp_catalog(state, net.config.n_items).exp()
    torch.testing.assert_close(copy.sum(1), torch.ones(3), atol=1e-5, rtol=0)
    for r in range(3):
        allowed = set(items[r, : int(last[r]) + 1].tolist()) - set(range(N_SPECIAL))
        assert set(torch.nonzero(copy[r] > 0).flatten().tolist()) <= allowed


@pytest.mark.parametrize("since", [False, True])
def test_a_canary_after_the_cut_changes_nothing(since):
    """Training: every position's copy weights over earlier positions ignore later tokens.
    Scoring: tokens after ``last`` (a canary event) leave the state unchanged -- also a canary
    that touches a context item again (what "touched again since" reads)."""
    net = _net(since=since)
    items, actions, gaps = _batch(net, 10)
    canary_items = torch.cat([items, items[:, 3:5]], 1)  # the canary repeats context items
    canary_actions, canary_gaps = torch.cat([actions, actions[:, :2]], 1), torch.cat([gaps, gaps[:, :2]], 1)
    with torch.no_grad():
        h0, h1 = net(items, actions, gaps), net(canary_items, canary_actions, canary_gaps)
        a0 = net.copy_log_alpha(h0, items, actions)
        a1 = net.copy_log_alpha(h1, canary_items, canary_actions)[:, :10, :10]
        torch.testing.assert_close(a0, a1)
        assert torch.isinf(net.copy_log_alpha(h1, canary_items, canary_actions)[:, :10, 10:]).all()
        last = torch.tensor([9, 9, 9])
        torch.testing.assert_close(
            net(items, actions, gaps, last=last), net(canary_items, canary_actions, canary_gaps, last=last)
        )


@pytest.mark.parametrize("since", [False, True])
def test_training_loss_is_finite_and_differentiable_both_softmaxes(since):
    net = _net(since=since).train()
    items, actions, gaps = _batch(net, 10)
    batch = {
        "items": items[:, :-1],
        "actions": actions[:, :-1],
        "gaps": gaps[:, :-1],
        "target_items": items[:, 1:],
        "target_actions": actions[:, 1:],
    }
    for loss in ("full", "sampled"):
        value, n = sequence_loss(net, batch, TrainConfig(loss=loss, n_negatives=8))
        value.backward()
        assert torch.isfinite(value) and n == 27
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        assert net.copy_head.recency_bias.grad.abs().sum() > 0
        if since:
            assert net.copy_head.since_bias.grad.abs().sum() > 0
        net.zero_grad()


def test_touched_again_since_is_read_by_action_and_only_up_to_the_query():
    from behaviorlm.nn.copy_head import CopyHead

    head = CopyHead(8, 6, since=True)
    with torch.no_grad():
        head.since_bias.copy_(torch.arange(6.0))
    items = torch.tensor([[2, 7, 8, 7, 9, 8]])  # BOS, then item 7 again at 3 (action 5), item 8 again at 5 (action 4)
    actions = torch.tensor([[2, 4, 4, 5, 4, 4]])
    got = head.touched_since(items, actions, torch.arange(6))[0]
    want = torch.zeros(6, 6)
    want[3:, 1] = 5.0  # from query 3 on, position 1's item was touched again with action 5
    want[5, 2] = 4.0  # from query 5, position 2's item with action 4
    torch.testing.assert_close(got, want)


def test_recency_buckets_are_exact_near_and_coarse_far():
    assert recency_bucket(torch.arange(8)).tolist() == list(range(8))
    far = recency_bucket(torch.tensor([8, 15, 16, 100, 10_000])).tolist()
    assert far == sorted(far) and far[0] == 8 and far[-1] == 15


def test_engine_ann_onnx_batch_and_online_agree(model, events, tmp_path):
    pytest.importorskip("onnxruntime")
    from behaviorlm.service.online import OnlineRecommender

    want = model.recommend(k=10, exclude_seen=False)
    path = tmp_path / "model"
    model.save(path)
    loaded = BehaviorLM.load(path)
    assert loaded.model_.copy_head is not None and float(loaded.model_.copy_head.gate_shift) == pytest.approx(0.7)
    _same_lists(loaded.recommend(k=10, exclude_seen=False), want)
    onnx = BehaviorLM.load(path).use_engine("onnx", path)
    _same_lists(onnx.recommend(k=10, exclude_seen=False), want)
    whole = BehaviorLM.load(path).use_retrieval("ann", IndexParams(min_fetch=100, ef_search=100))
    _same_lists(whole.recommend(k=10, exclude_seen=False), want)  # a fetch past the catalog: exact
    # a shallow fetch: the context items join the candidates, so the copy-ranked top stays the same
    ann = BehaviorLM.load(path).use_retrieval("ann", IndexParams(min_fetch=4, ef_search=16, tail_sample=16))
    top3 = lambda f: set(f.filter(pl.col("rank") <= 3).select("user_id", "item_id").rows())  # noqa: E731
    got3, want3 = top3(ann.recommend(k=10, exclude_seen=False)), top3(want)
    assert len(got3 & want3) >= 0.95 * len(want3)
    out = tmp_path / "scores.parquet"
    score_events(loaded.engine, model.history_events(), out, ScoringOptions(k=10, exclude_seen=False), progress=False)
    _same_lists(pl.read_parquet(out), want)
    online = OnlineRecommender.from_model(loaded)
    users = want["user_id"].unique().sort().to_list()[:8]
    got = online.recommend([online.query_for_user(u, k=10, exclude_seen=False) for u in users])
    for r in got:
        assert r.item_ids == want.filter(pl.col("user_id") == r.user_id)["item_id"].to_list()


def test_the_copy_part_ranks_the_users_own_items(model, events):
    """With the gate shifted open, the top of every list is the user's own recent items."""
    model.model_.copy_head.gate_shift.fill_(30.0)
    try:
        top = model.recommend(k=3, exclude_seen=False)
    finally:
        model.model_.copy_head.gate_shift.fill_(0.7)
    recent = model.histories_.group_by("user_id").tail(model.params["max_len"] - 1)
    own = set(map(tuple, recent.select("user_id", "item_id").rows()))
    assert all((u, i) in own for u, i in top.select("user_id", "item_id").rows())


def _same_lists(got: pl.DataFrame, want: pl.DataFrame, items_only: bool = False) -> None:
    cols = ["user_id", "item_id", "rank"]
    g, w = got.sort("user_id", "rank"), want.sort("user_id", "rank")
    assert g.select(cols).equals(w.select(cols))
    if not items_only:
        np.testing.assert_allclose(g["score"].to_numpy(), w["score"].to_numpy(), rtol=1e-4, atol=1e-7)


def _with_new_item(model: BehaviorLM, user, item: str = "fresh-1") -> pl.DataFrame:
    """The user's remembered history, then one event on an item the model has never seen."""
    hist = model.histories_.filter(pl.col("user_id") == user).select("user_id", "item_id", "event_type", "timestamp")
    fresh = hist.tail(1).with_columns(item_id=pl.lit(item), timestamp=pl.col("timestamp") + pl.duration(seconds=30))
    return pl.concat([hist, fresh])


def test_a_new_item_just_touched_is_returned_without_a_retrain(model, tmp_path):
    user = model.histories_["user_id"][0]
    events = _with_new_item(model, user)
    model.model_.copy_head.gate_shift.fill_(30.0)  # copy-dominated: the newest item must lead
    try:
        kept = model.recommend(events=events, k=5, exclude_seen=False)
        excluded = model.recommend(events=events, k=5, exclude_seen=True)
        out = tmp_path / "scores.parquet"
        enc_events = model.validate_input(events)
        score_events(model.engine, enc_events, out, ScoringOptions(k=5, exclude_seen=False), progress=False)
        batch = pl.read_parquet(out)
        ann = model.use_retrieval("ann", IndexParams(min_fetch=8, ef_search=16, tail_sample=16))
        via_ann = ann.recommend(events=events, k=5, exclude_seen=False)
        allowed = model.recommend(events=events, k=5, exclude_seen=False, allowed_items=["item1", "item2"])
    finally:
        model.use_retrieval("exact")
        model.model_.copy_head.gate_shift.fill_(0.7)
    assert "fresh-1" in kept["item_id"].to_list()
    assert "fresh-1" not in excluded["item_id"].to_list()
    assert batch.sort("rank")["item_id"].to_list() == kept["item_id"].to_list()
    assert via_ann["item_id"].to_list() == kept["item_id"].to_list()
    assert set(allowed["item_id"].to_list()) <= {"item1", "item2"}  # an allow-list names catalog items


def test_the_extended_mixture_is_a_distribution_and_evaluation_credits_new_items(model):
    from behaviorlm.evaluation.metrics import ContextCatalog, rank_targets
    from behaviorlm.evaluation.splits import Holdout

    user = model.histories_["user_id"][0]
    events = model.validate_input(_with_new_item(model, user))
    enc = model.engine.encode(events)
    h, a_logp = model.engine.heads(enc, slice(0, 1))
    p = model.engine.item_logp(h, a_logp, new_items=True).exp()
    assert p.shape[1] == model.model_.extended_width
    torch.testing.assert_close(p.sum(1), torch.ones(1), atol=1e-5, rtol=0)
    catalog = pl.Series("item_id", model.tokenizer_.items_)
    targets = pl.DataFrame({"user_id": [user], "item_id": ["fresh-1"], "event_type": ["view"]})
    ho = Holdout(events, targets.with_columns(timestamp=events.df["timestamp"].max()))
    ur = rank_targets(model, ho, ContextCatalog.of(catalog, events), k=10, exclude_seen=False)
    assert np.isinf(ur.ranks[0]) and np.isfinite(ur.ranks_context[0])


def test_the_service_returns_a_new_item_from_raw_events(model):
    from behaviorlm.service.online import OnlineRecommender
    from behaviorlm.service.request_events import RequestEncoder

    user = model.histories_["user_id"][0]
    events = _with_new_item(model, user)
    online = OnlineRecommender.from_model(model)
    model.model_.copy_head.gate_shift.fill_(30.0)
    try:
        want = model.recommend(events=events, k=5, exclude_seen=False)["item_id"].to_list()
        full = online.query_for_events(user, model.validate_input(events), k=5, exclude_seen=False)
        triples = [(i, a, t.isoformat()) for i, a, t in events.select("item_id", "event_type", "timestamp").rows()]
        lean = online.query_for_request(
            user, RequestEncoder(model.tokenizer_, model.input_schema_).encode(user, triples), k=5, exclude_seen=False
        )
        excluded = online.query_for_events(user, model.validate_input(events), k=5, exclude_seen=True)
        got = online.recommend([full, lean, excluded])
    finally:
        model.model_.copy_head.gate_shift.fill_(0.7)
    assert "fresh-1" in want and got[0].item_ids == want and got[1].item_ids == want
    assert "fresh-1" not in got[2].item_ids


def test_the_daily_increment_keeps_the_copy_head(events):
    m = BehaviorLM(max_len=12, dim=16, n_layers=1, n_heads=2, epochs=1, copy_head=True, seed=0, progress=False)
    m.fit(events)
    m.model_.copy_head.gate_shift.fill_(1.5)
    before = {k: v.clone() for k, v in m.model_.copy_head.state_dict().items()}
    day = (
        m.histories_.group_by("user_id")
        .tail(2)
        .with_columns(
            item_id=pl.lit("brand-new"),
            event_type=pl.lit("add_to_favorites"),
            timestamp=pl.col("timestamp") + pl.duration(days=1),
        )
    )
    m.fit_partial(day, epochs=1, lr=1e-9)
    after = m.model_.copy_head.state_dict()
    assert float(after["gate_shift"]) == 1.5 and after["action_bias"].shape[0] == before["action_bias"].shape[0] + 1
    torch.testing.assert_close(after["recency_bias"], before["recency_bias"], atol=1e-4, rtol=0)
    assert "brand-new" in m.tokenizer_.items_  # the vocabulary grew; the copy head's shapes followed it


def test_warm_start_makes_the_copy_part_the_buy_again_rule():
    """With the attention term off, the copy weights are ``w[action] * 0.5 ** (age / half_life)``."""
    from behaviorlm.nn.copy_head import CopyHead

    head = CopyHead(8, 6)
    torch.nn.init.zeros_(head.query.weight)  # the attention term at zero: only the biases speak
    torch.nn.init.zeros_(head.query.bias)
    weights = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.4])
    head.warm_start(2.0, weights)
    items = torch.tensor([[1, 7, 8, 7, 9]])  # BOS, then events aged 3, 2, 1, 0
    actions = torch.tensor([[1, 4, 5, 4, 4]])
    alpha = head.position_logits_at(torch.randn(1, 8), torch.randn(1, 5, 8), items, actions, torch.tensor([4])).exp()
    rule = torch.tensor([0.0, 0.1 * 0.5**1.5, 0.4 * 0.5**1.0, 0.1 * 0.5**0.5, 0.1])
    torch.testing.assert_close(alpha[0], rule / rule.sum(), atol=1e-5, rtol=1e-4)


def test_the_fast_mixture_equals_the_plain_one():
    from behaviorlm.nn.copy_head import gate_logps, mix

    net = _net()
    items, actions, gaps = _batch(net, 10)
    state = net(items, actions, gaps, last=torch.tensor([9, 5, 2]))
    lay, a = net.state_layout, torch.full((3,), N_SPECIAL + 1)
    h = net.hidden(state)
    gen = torch.log_softmax(net.item_logits(h, a), -1)
    log_g, log_1mg = gate_logps(net.copy_head.gate_logits(net.item_query(h, a)), lay.has_copy(state))
    plain = mix(gen, lay.copy_logp_catalog(state, net.config.n_items), log_g, log_1mg)
    torch.testing.assert_close(net.item_logp(state, a), plain)


def test_a_remembered_new_item_is_returned_to_a_known_user(model):
    """The pipeline's model remembers events after training (BehaviorLM.remember), new items
    included: a known user's request returns them, named, as their raw events would."""
    import copy

    from behaviorlm.service.online import OnlineRecommender

    user = model.histories_["user_id"][0]
    events = _with_new_item(model, user, "fresh-2")
    knowing = copy.deepcopy(model).remember(events)
    knowing.model_.copy_head.gate_shift.fill_(30.0)
    online = OnlineRecommender.from_model(knowing)
    want = knowing.recommend(events=events, k=5, exclude_seen=False)["item_id"].to_list()
    got = online.recommend([online.query_for_user(user, k=5, exclude_seen=False)])[0].item_ids
    assert "fresh-2" in want and got == want
    assert knowing.recommend([user], k=5, exclude_seen=False)["item_id"].to_list() == want


def test_touched_again_since_survives_saving_and_the_onnx_export(events, tmp_path):
    pytest.importorskip("onnxruntime")
    m = BehaviorLM(max_len=16, dim=16, n_layers=1, n_heads=2, epochs=1, copy_head=True, copy_since=True, seed=0)
    m.set_params(progress=False).fit(events)
    with torch.no_grad():
        m.model_.copy_head.since_bias.copy_(torch.linspace(-2.0, 3.0, m.model_.copy_head.since_bias.shape[0]))
    want = m.recommend(k=10, exclude_seen=False)
    m.save(tmp_path / "m")
    _same_lists(BehaviorLM.load(tmp_path / "m").recommend(k=10, exclude_seen=False), want)
    _same_lists(
        BehaviorLM.load(tmp_path / "m").use_engine("onnx", tmp_path / "m").recommend(k=10, exclude_seen=False), want
    )


def test_the_copy_since_recipe_is_a_preview_used_only_when_named():
    from behaviorlm.recipes import get_recipe

    assert get_recipe("clickstream-small").ref == "clickstream-small@2"
    assert get_recipe("clickstream-small@3").params["copy_since"] is True
    assert BehaviorLM("clickstream-small").params["copy_since"] is False
