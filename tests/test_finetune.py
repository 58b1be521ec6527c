"""The stages after pretraining: their objectives, their data, and the estimator and CLI around them."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest
import torch

from behaviorlm.data.events import validate_events
from behaviorlm.errors import ConfigurationError, InputDataError
from behaviorlm.evaluation import per_user_metrics, rank_targets
from behaviorlm.evaluation.baselines import CartBaseline, PurchaseCooccurrenceBaseline, PurchasePopularityBaseline
from behaviorlm.evaluation.purchase import ActionScorer, next_event_holdout
from behaviorlm.evaluation.splits import purchase_split
from behaviorlm.finetune.pairs import mine_pairs
from behaviorlm.finetune.stages import StageConfig, slate_rewards
from behaviorlm.nn.preference import (
    LOG2,
    dpo_loss,
    group_advantages,
    kl_to_reference,
    plackett_luce_logp,
    sdpo_loss,
)
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.tokenizer import ActionTokenizer

T0 = 1_700_000_000


def make_shop(n_users: int = 60, sessions: int = 4, n_items: int = 30, seed: int = 0) -> pl.DataFrame:
    """Sessions of views, a cart or two, and one purchase -- always of the newest carted item --
    a rule the stages can learn and the cart baseline knows; one cart is left unbought."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        t = T0 + u * 10
        for _ in range(sessions):
            viewed = rng.choice(n_items, 5, replace=False)
            for i in viewed:
                rows.append((u, f"i{i}", "view", t))
                t += 60
            carted = viewed[:2]
            for i in carted:
                rows.append((u, f"i{i}", "add_to_cart", t))
                t += 60
            rows.append((u, f"i{carted[-1]}", "purchase", t))
            t += 86_400 * 2
    return pl.DataFrame(rows, schema=["user_id", "item_id", "event_type", "timestamp"], orient="row").with_columns(
        pl.from_epoch("timestamp")
    )


@pytest.fixture(scope="module")
def shop():
    return validate_events(make_shop())


@pytest.fixture(scope="module")
def base(shop):
    split = purchase_split(shop)
    model = BehaviorLM(
        "quick", epochs=3, dim=16, n_layers=1, n_heads=1, max_len=30, copy_head=True, progress=False, seed=0
    )
    return model.fit(
        split.train, split.valid, exclude_seen=False, training_data={"source": "shop", "holdout": "purchase"}
    )


# ----------------------------------------------------------------------------- objectives


def test_the_dpo_loss_equals_a_hand_computed_value_and_log_2_at_the_reference():
    pol_w, pol_l, ref_w, ref_l, beta = -1.0, -2.0, -1.5, -1.0, 0.5
    margin = beta * ((pol_w - ref_w) - (pol_l - ref_l))  # 0.5 * (0.5 + 1.0) = 0.75
    expected = math.log1p(math.exp(-margin))
    got = dpo_loss(torch.tensor([pol_w]), torch.tensor([[pol_l]]), torch.tensor([ref_w]), torch.tensor([[ref_l]]), beta)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.38687, abs=1e-5)  # log(1 + e^-0.75), by hand
    lp_w, lp_l = torch.randn(5), torch.randn(5, 3)
    assert dpo_loss(lp_w, lp_l, lp_w, lp_l, 0.1).item() == pytest.approx(LOG2, abs=1e-6)
    assert sdpo_loss(lp_w, lp_l, lp_w, lp_l, 0.1).item() > LOG2  # three rejected in one softmax: log(1 + 3)


def test_s_dpo_with_one_rejected_item_is_dpo_and_padding_is_ignored():
    pol_w, ref_w = torch.randn(4), torch.randn(4)
    pol_l, ref_l = torch.randn(4, 1), torch.randn(4, 1)
    assert torch.allclose(sdpo_loss(pol_w, pol_l, ref_w, ref_l, 0.3), dpo_loss(pol_w, pol_l, ref_w, ref_l, 0.3))
    padded_l = torch.cat([pol_l, torch.full((4, 2), 123.0)], 1)
    padded_r = torch.cat([ref_l, torch.full((4, 2), -7.0)], 1)
    valid = torch.tensor([[True, False, False]] * 4)
    for fn in (dpo_loss, sdpo_loss):
        assert torch.allclose(fn(pol_w, padded_l, ref_w, padded_r, 0.3, valid), fn(pol_w, pol_l, ref_w, ref_l, 0.3))


def test_the_grpo_advantage_of_equal_rewards_is_zero_and_standardised_otherwise():
    assert torch.equal(group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])), torch.zeros(2, 3))
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert adv.sum().item() == pytest.approx(0.0, abs=1e-6)
    assert adv[0, 0] > 0 > adv[0, 1]
    assert adv.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_the_kl_term_is_zero_at_the_reference_and_positive_elsewhere():
    lp = torch.log_softmax(torch.randn(3, 7), -1)
    assert torch.equal(kl_to_reference(lp, lp), torch.zeros_like(lp))
    assert (kl_to_reference(lp, lp + 0.3) > 0).all()


def test_slate_probabilities_without_replacement_sum_to_one():
    p = torch.tensor([0.5, 0.3, 0.2])
    slates = torch.tensor(list(itertools.permutations(range(3), 2)))  # every ordered pair
    total = plackett_luce_logp(p.log()[slates][None]).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-5)


def test_a_slate_is_rewarded_for_the_purchase_and_softly_for_a_carted_item():
    slates = torch.tensor([[[5, 6], [7, 8], [9, 10]]])
    r = slate_rewards(slates, torch.tensor([6]), [np.array([8])], soft=0.25)
    assert r.tolist() == [[1.0, 0.25, 0.0]]


# ----------------------------------------------------------------------------- protocol and data


def test_the_purchase_split_never_lets_a_target_or_anything_after_it_in():
    df = make_shop(n_users=5).vstack(
        pl.DataFrame(  # a cart in the same second as user 0's last purchase: not input
            {"user_id": [0], "item_id": ["i99"], "event_type": ["add_to_cart"], "timestamp": [None]}
        ).with_columns(
            pl.lit(make_shop(n_users=5).filter(pl.col("user_id") == 0)["timestamp"].max()).alias("timestamp")
        )
    )
    split = purchase_split(validate_events(df))
    assert (split.test.targets["event_type"] == "purchase").all() and split.test.n_users == 5
    for ho in (split.valid, split.test):
        joined = ho.inputs.df.join(ho.targets.select("user_id", pl.col("timestamp").alias("t")), on="user_id")
        assert (joined["timestamp"] < joined["t"]).all()
    assert "i99" not in split.test.inputs.df["item_id"].to_list()
    cut = split.valid.targets.select("user_id", pl.col("timestamp").alias("t"))
    assert (split.train.df.join(cut, on="user_id")["timestamp"] < split.train.df.join(cut, on="user_id")["t"]).all()


def test_pairs_never_contain_an_evaluation_target(shop):
    split = purchase_split(shop)
    tok = ActionTokenizer(max_len=30).fit(split.train)
    pairs = mine_pairs(split.train, tok, contexts_per_user=50)
    first_target = (
        pl.concat([split.valid.targets, split.test.targets]).group_by("user_id").agg(pl.col("timestamp").min())
    )
    cut = dict(zip(first_target["user_id"].to_list(), first_target["timestamp"].to_numpy(), strict=True))
    user_of_row = np.asarray(tok.encode(split.train).user_ids)
    assert len(pairs) > 0
    for c in range(len(pairs)):
        assert pairs.times[c] < cut[user_of_row[pairs.users[c]]]
    # the check can fail: mined from every event, the targets themselves become contexts
    leaky = mine_pairs(shop, ActionTokenizer(max_len=30).fit(shop), contexts_per_user=50)
    assert any(t >= cut[u] for t, u in zip(leaky.times, np.asarray(leaky_users(shop))[leaky.users], strict=True))


def leaky_users(events):
    return ActionTokenizer(max_len=30).fit(events).encode(events).user_ids


def test_a_context_is_the_events_strictly_before_its_purchase_and_rejects_only_never_bought_items(shop):
    split = purchase_split(shop)
    tok = ActionTokenizer(max_len=30).fit(split.train)
    pairs = mine_pairs(split.train, tok, contexts_per_user=50, n_rejected=8)
    batch = pairs.batch(np.arange(len(pairs)))
    last_items = batch["items"][torch.arange(len(pairs)), batch["last"]]
    last_actions = tok.decode_actions(batch["actions"][torch.arange(len(pairs)), batch["last"]].numpy())
    assert set(last_actions) == {"add_to_cart"}  # in make_shop the event before each purchase is its cart
    assert torch.equal(last_items, batch["chosen"])
    for c in range(len(pairs)):
        rejected = pairs.rejected[c][pairs.rejected[c] != 0]
        assert len(rejected) and not np.isin(rejected, pairs.bought[pairs.users[c]]).any()


def test_the_shop_rules_rank_as_a_shop_would():
    ev = validate_events(
        pl.DataFrame(
            {
                "user_id": [1, 1, 1, 1, 2, 2],
                "item_id": ["a", "b", "b", "c", "a", "b"],
                "event_type": ["add_to_cart", "add_to_cart", "purchase", "view", "view", "purchase"],
                "timestamp": [T0 + i for i in range(6)],
            }
        ).with_columns(pl.from_epoch("timestamp"))
    )
    catalog = pl.Series("item_id", ["a", "b", "c", "d"])
    ((_, cart),) = CartBaseline().fit(ev, catalog).score(ev, [1], catalog)
    assert cart[0].argsort(descending=True).tolist()[:3] == [0, 2, 1]  # open cart a, then c (newest), then bought b
    ((_, pop),) = PurchasePopularityBaseline().fit(ev, catalog).score(ev, [1], catalog)
    assert pop[0].argmax().item() == 1
    ((_, cooc),) = PurchaseCooccurrenceBaseline().fit(ev, catalog).score(ev, [2], catalog)
    assert cooc[0].argmax().item() == 1  # after touching b, b was bought; user 2's last item is b


# ----------------------------------------------------------------------------- the estimator and CLI


def test_dpo_fine_tuning_keeps_the_base_and_records_the_stage(shop, base, tmp_path):
    split = purchase_split(shop)
    before = {k: v.clone() for k, v in base.model_.state_dict().items()}
    tuned = base.finetune(split.train, "dpo", validation=split.valid, epochs=2, lr=1e-3, progress=False)
    assert all(torch.equal(v, base.model_.state_dict()[k]) for k, v in before.items())  # the base is untouched
    stage = tuned.stages_[-1]
    assert stage["method"] == "dpo" and stage["parent_version"] == base.model_version == tuned.parent_version_
    assert stage["contexts"] > 0 and stage["pairs"] >= stage["contexts"]
    assert all(np.isfinite(e["loss"]) for e in stage["epochs"])
    if stage["best_epoch"]:
        assert tuned.model_version != base.model_version
    tuned.save(tmp_path / "m")
    again = BehaviorLM.load(tmp_path / "m", retrieval="exact")
    assert again.stages_ == tuned.stages_ and again.parent_version_ == base.model_version
    score = lambda m: per_user_metrics(  # noqa: E731
        rank_targets(ActionScorer(m), split.valid, pl.Series("item_id", base.tokenizer_.items_), 10, False).ranks, 10
    )["ndcg@10"].mean()
    assert score(tuned) >= score(base)  # the kept epoch is never worse on validation than the base


def test_without_a_better_epoch_the_reference_is_returned_unchanged(shop, base):
    split = purchase_split(shop)
    tuned = base.finetune(split.train, "sft", validation=split.valid, epochs=1, lr=1e-12, progress=False)
    st = tuned.stages_[-1]  # a step of 1e-12 cannot change a ranking: ties keep the reference
    assert st["best_epoch"] == 0 and tuned.model_version == base.model_version


@pytest.mark.parametrize("method", ["sdpo", "grpo"])
def test_the_other_stages_train_to_finite_losses(shop, base, method):
    split = purchase_split(shop)
    tuned = base.finetune(split.train, method, epochs=1, negatives="mixed", group_size=4, slate=3, progress=False)
    st = tuned.stages_[-1]
    assert st["best_epoch"] == 0 and len(st["epochs"]) == 1  # no validation: the last epoch is kept
    assert all(np.isfinite(v) for k, v in st["epochs"][0].items() if isinstance(v, float))
    assert tuned.model_version != base.model_version


def test_the_next_event_task_of_a_purchase_split_is_after_the_training_cut(shop):
    split = purchase_split(shop)
    nxt = next_event_holdout(shop, split)
    cut = split.valid.targets.select("user_id", pl.col("timestamp").alias("t"))
    assert (nxt.targets.join(cut, on="user_id").select(pl.col("timestamp") > pl.col("t")).to_series()).all()


def test_bad_stage_settings_and_data_get_clear_errors(shop, base):
    with pytest.raises(ConfigurationError, match="method must be one of"):
        StageConfig(method="ppo")
    with pytest.raises(ConfigurationError, match="negatives must be one of"):
        StageConfig(negatives="random")
    no_buys = validate_events(make_shop(n_users=3).filter(pl.col("event_type") != "purchase"))
    with pytest.raises(InputDataError, match="no 'purchase' events.*event_type"):
        base.finetune(no_buys, "dpo", progress=False)
    with pytest.raises(InputDataError, match="window must be"):
        base.finetune(shop, "dpo", window="yesterday", progress=False)
    with pytest.raises(InputDataError, match="unknown action 'checkout'"):
        base.finetune(shop, "dpo", action="checkout", progress=False)


# ----------------------------------------------------------------------------- adapters


def _logits(net, batch):
    state = net(batch["items"], batch["actions"], batch["gaps"], last=batch["last"])
    actions = torch.full((len(state),), 3, dtype=torch.long)
    return net.item_logp(state, actions), net.action_logits(state)


def test_a_lora_adapter_at_initialisation_changes_no_logit_and_merging_changes_nothing(shop, base):
    import copy

    from behaviorlm.nn.lora import add_adapters, merged

    split = purchase_split(shop)
    batch = mine_pairs(split.train, base.tokenizer_).batch(np.arange(20))
    net = copy.deepcopy(base.model_)
    names = add_adapters(net, rank=4, alpha=8.0)
    assert len(names) == 4 * base.model_.config.n_layers
    with torch.no_grad():
        for a, b in zip(_logits(net, batch), _logits(base.model_, batch), strict=True):
            assert torch.equal(a, b)
        for m in net.modules():  # a trained adapter: B no longer zero
            if hasattr(m, "lora_b"):
                m.lora_b.normal_(0, 0.1)
        adapted, folded = _logits(net, batch), _logits(merged(net), batch)
    assert not torch.allclose(adapted[0], _logits(base.model_, batch)[0])
    for a, b in zip(adapted, folded, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_training_an_adapter_leaves_the_base_weights_alone_and_it_travels_with_the_model(shop, base, tmp_path):
    model = BehaviorLM.load(_saved(base, tmp_path / "base"), retrieval="exact")
    before = {k: v.clone() for k, v in model.model_.state_dict().items()}
    segment = validate_events(make_shop(n_users=20, seed=1))
    model.fit_adapter(segment, "segment=a", rank=4, epochs=1, describe={"segment": "a"})
    assert all(torch.equal(v, model.model_.state_dict()[k]) for k, v in before.items())
    meta = model.adapters_["segment=a"].meta
    assert meta["base_version"] == model.model_version and meta["segment"] == "a"
    assert 0 < meta["parameters"] < meta["base_parameters"]
    adapted = model.with_adapter("segment=a")
    assert adapted.model_version == f"{model.model_version}+segment=a"
    with_adapter = model.recommend(events=segment.df, k=5, adapter="segment=a")
    assert with_adapter.equals(adapted.recommend(events=segment.df, k=5))
    assert not with_adapter.equals(model.recommend(events=segment.df, k=5))
    model.save(tmp_path / "base")
    again = BehaviorLM.load(tmp_path / "base", retrieval="exact")
    assert again.recommend(events=segment.df, k=5, adapter="segment=a").equals(with_adapter)


def _saved(model, path):
    model.save(path)
    return path


def test_an_unknown_adapter_and_one_of_another_base_get_clear_errors(shop, base, tmp_path):
    from behaviorlm.errors import ModelFormatError

    model = BehaviorLM.load(_saved(base, tmp_path / "m"), retrieval="exact")
    model.fit_adapter(validate_events(make_shop(n_users=10, seed=2)), "north", rank=2, epochs=1)
    with pytest.raises(ConfigurationError, match=r"unknown adapter 'south'; this model has: \['north'\]"):
        model.recommend(users=[0], adapter="south")
    other = base.finetune(purchase_split(shop).train, "sft", epochs=1, lr=1e-2, progress=False)
    other.adapters_ = model.adapters_  # the north adapter moved onto different weights
    with pytest.raises(ModelFormatError, match="'north' was trained on base model .* not on this model"):
        other.with_adapter("north")
    with pytest.raises(ModelFormatError, match="adapter name"):
        model.fit_adapter(make_shop(n_users=2), "../escape")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"user_id": ["1", "x7"], "tier": ["a", "b"]}, r"1 row\(s\) .* user_id that is not .*row 1 \(user_id 'x7'\)"),
        ({"user_id": [1, 2], "tier": ["a", None]}, r"no value in column 'tier': row 1 \(user_id 2\)"),
        ({"user_id": [1, 1], "tier": ["a", "b"]}, r"1 user\(s\) have more than one 'tier' value .*user_id 1"),
    ],
)
def test_adapters_per_segment_refuse_a_user_table_that_would_drop_users(shop, base, table, message):
    """Ids that do not cast, missing values and two values for a user are named, not dropped."""
    from behaviorlm.fitting import fit_adapters_by

    with pytest.raises(InputDataError, match=message):
        fit_adapters_by(base, shop, pl.DataFrame(table), "tier", rank=2, epochs=1)


def test_the_cli_fine_tunes_on_the_models_own_training_period_and_fits_adapters_per_segment(tmp_path):
    from typer.testing import CliRunner

    from behaviorlm.cli import app
    from tests.conftest import cli_failed

    runner = CliRunner()
    events = tmp_path / "shop.csv"
    make_shop(n_users=40).write_csv(events)
    small = ["--epochs", "2", "--dim", "16", "--layers", "1", "--heads", "1", "--max-len", "30", "--copy-head"]
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    res = runner.invoke(app, ["train", "--events", str(events), "--holdout", "purchase", "--out", str(base), *small])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["finetune", "--model", str(base), "--events", str(events), "--out", str(tuned), "--epochs", "1"]
    )
    assert res.exit_code == 0, res.output
    assert "saved dpo model" in res.output and "validation purchase ndcg@10" in res.output
    model = BehaviorLM.load(tuned, retrieval="exact")
    assert model.stages_[0]["method"] == "dpo" and model.training_data_["holdout"] == "purchase"
    split = purchase_split(validate_events(make_shop(n_users=40)))
    assert model.stages_[0]["contexts"] <= split.train.df.filter(pl.col("event_type") == "purchase").height
    users = tmp_path / "users.csv"
    pl.DataFrame({"user_id": list(range(40)), "tier": ["High"] * 25 + ["Low"] * 15}).write_csv(users)
    res = runner.invoke(
        app, ["adapt", "--model", str(tuned), "--events", str(events), "--users", str(users), "--by", "tier",
              "--rank", "2", "--epochs", "1", "--min-users", "20"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "saved 1 adapter(s)" in res.output and "tier=High" in res.output  # Low: 15 users, skipped
    res = runner.invoke(app, ["recommend", "--model", str(tuned), "--user", "1", "--adapter", "tier=High"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["recommend", "--model", str(tuned), "--user", "1", "--adapter", "tier=Mid"])
    assert "--adapter must be one of: ['tier=High']" in cli_failed(res)
    res = runner.invoke(app, ["finetune", "--model", str(base), "--events", str(events), "--out", str(tmp_path / "x"),
                              "--method", "ppo"])  # fmt: skip
    assert "--method one of" in cli_failed(res)


def test_the_api_ranks_with_an_adapter_when_asked_and_names_the_known_ones_otherwise(shop, base, tmp_path):
    import httpx

    from behaviorlm.service.api import create_app
    from behaviorlm.testing import UvicornThread

    model = BehaviorLM.load(_saved(base, tmp_path / "m"), retrieval="exact")
    model.fit_adapter(validate_events(make_shop(n_users=20, seed=3)), "market=de", rank=4, epochs=2, lr=1e-2)
    user = int(model.histories_["user_id"][0])
    with UvicornThread(create_app(model, api_key="")) as url, httpx.Client(base_url=url, timeout=30) as c:
        plain = c.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
        adapted = c.post("/v1/recommend", json={"user_id": user, "k": 5, "adapter": "market=de"}).json()
        bad = c.post("/v1/recommend", json={"user_id": user, "adapter": "market=fr"})
    want = model.recommend([user], k=5, adapter="market=de", exclude_seen=model.exclude_seen_)
    assert [i["item_id"] for i in adapted["items"]] == want["item_id"].to_list()
    assert adapted["model_version"].endswith("+ adapter market=de") and "adapter" not in plain["model_version"]
    assert bad.status_code == 422 and "unknown adapter 'market=fr'; this model has: ['market=de']" in bad.text


def test_the_pyfunc_selects_an_adapter_per_call(shop, base, tmp_path):
    import pandas as pd

    from behaviorlm import tracking

    model = BehaviorLM.load(_saved(base, tmp_path / "m"), retrieval="exact")
    model.fit_adapter(validate_events(make_shop(n_users=20, seed=4)), "market=nl", rank=4, epochs=2, lr=1e-2)
    users = pd.DataFrame({"user_id": model.histories_["user_id"].head(3).to_list()})
    out = tracking.predict_frame(model, users, {"k": 4, "adapter": "market=nl"})
    want = model.recommend(users["user_id"].tolist(), k=4, adapter="market=nl").to_pandas()
    assert out["item_id"].tolist() == want["item_id"].tolist()
    with pytest.raises(ConfigurationError, match="unknown adapter 'market=be'"):
        tracking.predict_frame(model, users, {"adapter": "market=be"})
