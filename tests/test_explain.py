"""Explainer: grounded contexts, the offline template, and the real openai client against a
scripted loopback server playing good, broken, hallucinating, injected, failing and slow answers."""

from __future__ import annotations

import json
import logging
import time

import polars as pl
import pytest

from behaviorlm.data.events import validate_events
from behaviorlm.explain import (
    MAX_TEXT,
    LLMConfig,
    LLMExplainer,
    TemplateExplainer,
    build_contexts,
    explain_batch,
    make_explainer,
    validate_rationales,
)
from behaviorlm.testing import INJECTED_ITEM, ScriptedLLM
from tests.conftest import INJECTION, shopper_events

SECRET = "sk-test-never-log-me"


def _config(llm: ScriptedLLM, **kw) -> LLMConfig:
    return LLMConfig(base_url=llm.base_url, model="scripted", timeout_s=kw.pop("timeout_s", 5.0), max_retries=0, **kw)


def test_contexts_are_grounded_and_sanitised(contexts):
    c1 = contexts[0]
    assert [e["id"] for e in c1.events] == ["E1", "E2", "E3"] and c1.events[2]["action"] == "add_to_cart"
    assert c1.item_ids() == ["b", "c"] and c1.profile == {"propensity": 0.712, "tier": "High", "usual_price": 3.5}
    assert c1.recommendations[1]["title"] == "Green tea"  # control characters stripped
    assert len(contexts[1].recommendations[1]["title"]) == MAX_TEXT
    assert {"E1", "R1.category", "R2.brand", "P.tier"} <= c1.fact_ids()
    assert "R2.brand" not in contexts[1].fact_ids()  # the teapot has no brand: not a fact


def test_template_is_deterministic_and_cites_real_facts(contexts):
    t = TemplateExplainer()
    for ctx in contexts:
        out = t.explain(ctx)
        assert out == t.explain(ctx)
        good, problems = validate_rationales(ctx, out)
        assert not problems and set(good) == set(ctx.item_ids())
    by_item = {r.item_id: r for r in t.explain(contexts[0])}
    assert "cart" in by_item["c"].rationale and by_item["c"].evidence == ["E3"]  # the user carted it
    assert "kitchen" in by_item["b"].rationale  # same category as the red mug


def test_good_answer_is_used_and_the_key_stays_secret(contexts, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("BEHAVIORLM_LLM_API_KEY", SECRET)  # a custom endpoint's own key (never OpenAI's)
    caplog.set_level(logging.DEBUG)
    with ScriptedLLM(["good"]) as llm:
        ex = LLMExplainer(_config(llm), cache_dir=tmp_path)
        df = explain_batch(contexts, ex)
    assert df["source"].to_list() == ["llm"] * 4 and df.columns == [
        "user_id",
        "item_id",
        "rationale",
        "evidence",
        "evidence_facts",
        "attributed",
        "source",
        "model_version",
    ]
    for ids, facts in zip(df["evidence"], df["evidence_facts"], strict=True):  # every cited id in words
        assert [f.split(":")[0] for f in facts] == ids.to_list() and "not in the context" not in " ".join(facts)
    body = llm.requests[0]["body"]
    assert (
        body["temperature"] == 0.3
        and body["response_format"] == {"type": "json_object"}
        and body["model"] == "scripted"
    )
    assert llm.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"  # sent to the endpoint only
    assert SECRET not in caplog.text and all(SECRET not in p.read_text() for p in tmp_path.iterdir())
    s = ex.stats.summary()
    assert s["grounding_rate"] == 1.0 and s["fallback_rate"] == 0.0 and s["prompt_tokens"] == 200


@pytest.mark.parametrize(
    ("script", "hallucinations", "repairs", "fallbacks"),
    [
        (["malformed", "good"], 0, 1, 0),
        (["malformed", "malformed"], 0, 1, 2),
        (["hallucinated_item", "good"], 1, 1, 0),
        (["hallucinated_item", "hallucinated_item"], 2, 1, 1),
        (["invented_evidence", "good"], 1, 1, 0),
        (["invented_evidence", "invented_evidence"], 2, 1, 1),
    ],
)
def test_violations_get_one_repair_then_fallback(contexts, script, hallucinations, repairs, fallbacks):
    with ScriptedLLM(script) as llm:
        ex = LLMExplainer(_config(llm))
        out = ex.explain(contexts[0])
    assert len(llm.requests) == 2  # the first answer and exactly one repair
    repair_prompt = llm.requests[1]["body"]["messages"][-1]["content"]
    assert "broke the rules" in repair_prompt
    assert [r.item_id for r in out] == ["b", "c"]
    assert sum(r.source == "fallback" for r in out) == fallbacks
    assert (ex.stats.hallucinations, ex.stats.repairs, ex.stats.fallback_items) == (hallucinations, repairs, fallbacks)
    for r in out:
        assert set(r.evidence) <= contexts[0].fact_ids()


def test_injected_catalog_text_cannot_steer_the_output(contexts):
    with ScriptedLLM(["injection_echo", "injection_echo"]) as llm:
        ex = LLMExplainer(_config(llm))
        out = ex.explain(contexts[0])
    prompt = llm.requests[0]["body"]["messages"]
    assert INJECTION not in prompt[0]["content"]  # the system prompt is ours alone
    data_block = prompt[1]["content"].split("<data>")[1]
    assert json.dumps(INJECTION) in data_block  # the title travels only as quoted data
    assert [r.item_id for r in out] == ["b", "c"] and INJECTED_ITEM not in {r.item_id for r in out}
    assert not any("ignore previous" in r.rationale.lower() for r in out)
    assert ex.stats.hallucinations >= 2 and ex.stats.fallback_items == 1


def test_http_errors_and_timeouts_fall_back_within_bounds(contexts):
    with ScriptedLLM(["http500"]) as llm:
        cfg = LLMConfig(base_url=llm.base_url, model="m", timeout_s=5, max_retries=1)
        ex = LLMExplainer(cfg)
        out = ex.explain(contexts[0])
    assert len(llm.requests) == 2  # one try + one SDK retry, then stop
    assert [r.source for r in out] == ["fallback", "fallback"] and ex.stats.errors == 1
    with ScriptedLLM(["slow"], slow_s=3.0) as llm:
        ex = LLMExplainer(_config(llm, timeout_s=0.5))
        t0 = time.perf_counter()
        out = ex.explain(contexts[1])
        elapsed = time.perf_counter() - t0
    # the 0.5 s timeout cut the 3 s answer short: 2.5 s leaves 5x headroom on a loaded machine and
    # is still below what waiting for the slow server would take
    assert elapsed < 2.5 and [r.source for r in out] == ["fallback", "fallback"] and ex.stats.errors == 1


def test_servers_without_json_mode_still_work(contexts):
    with ScriptedLLM(["no_json_mode"]) as llm:
        ex = LLMExplainer(_config(llm))
        first, second = ex.explain(contexts[0]), ex.explain(contexts[1])
    assert [r.source for r in first + second] == ["llm"] * 4
    assert ["response_format" in r["body"] for r in llm.requests] == [True, False, False]  # asked once, then not


def test_older_purchases_stay_in_the_context(catalog):
    rows = [(1, "a", "purchase", 0)] + [(1, "b", "view", 10 + i) for i in range(30)]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "event_type", "timestamp"], orient="row")
    events = validate_events(frame, time_unit="s", plausible_times=False)  # synthetic times
    recs = pl.DataFrame({"user_id": [1], "item_id": ["c"], "score": [0.5], "rank": [1]})
    (ctx,) = build_contexts(recs, events, catalog, n_events=5)
    assert [e["action"] for e in ctx.events] == ["purchase"] + ["view"] * 5
    assert [e["id"] for e in ctx.events] == [f"E{i}" for i in range(1, 7)]


def test_cache_hits_skip_the_endpoint(contexts, tmp_path):
    with ScriptedLLM(["good"]) as llm:
        first = LLMExplainer(_config(llm), cache_dir=tmp_path).explain(contexts[0])
        again = LLMExplainer(_config(llm), cache_dir=tmp_path)
        second = again.explain(contexts[0])
        assert len(llm.requests) == 1 and second == first and again.stats.cached_users == 1
        contexts[0].model_version = "m2"  # a new model version is a new key
        again.explain(contexts[0])
        assert len(llm.requests) == 2


def test_batch_concurrency_and_offline_default(contexts, monkeypatch):
    with ScriptedLLM(["good"]) as llm:
        ex = LLMExplainer(_config(llm, concurrency=4))
        df = explain_batch(contexts * 5, ex, progress=False)
    assert df.height == 20 and len(llm.requests) == 10 and ex.stats.users == 10
    for var in ("OPENAI_API_KEY", "BEHAVIORLM_LLM_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(make_explainer(), TemplateExplainer)
    monkeypatch.setenv("BEHAVIORLM_LLM_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("BEHAVIORLM_LLM_TIMEOUT_S", "3")
    chosen = make_explainer()
    assert isinstance(chosen, LLMExplainer) and chosen.config.timeout_s == 3.0
    assert isinstance(make_explainer(offline=True), TemplateExplainer)


def test_openai_key_goes_to_openai_only(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert LLMConfig().key_env == "OPENAI_API_KEY" and LLMConfig().configured
    assert LLMConfig(base_url="https://api.openai.com/v1").key_env == "OPENAI_API_KEY"
    for url in ("http://127.0.0.1:8080/v1", "https://api.openai.com.example.net/v1", "http://api.openai.com/v1"):
        assert LLMConfig(base_url=url).key_env == "BEHAVIORLM_LLM_API_KEY", url


def _attributed_contexts(catalog, contributions: dict[tuple[int, str], list[tuple[str, float]]]):
    """The fixture's users with attributions: (user, recommended item) -> [(event item, nats)]."""
    from behaviorlm.explain.attribution import COLUMNS

    events = shopper_events()
    recs = pl.DataFrame({"user_id": [1, 1, 2], "item_id": ["b", "c", "a"], "score": [0.3, 0.2, 0.5], "rank": [1, 2, 1]})
    rows = []
    for (user, item), parts in contributions.items():
        mine = events.df.filter(pl.col("user_id") == user)
        for e_item, nats in parts:
            e = mine.filter(pl.col("item_id") == e_item).row(0, named=True)
            rows.append(
                {
                    "user_id": user,
                    "item_id": item,
                    "event_index": 0,
                    "event_item": e_item,
                    "event_action": e["event_type"],
                    "event_time": e["timestamp"],
                    "contribution": nats,
                    "copy_weight": None,
                    "score": -1.0,
                }
            )
    att = pl.DataFrame(rows, schema_overrides={"copy_weight": pl.Float64}).select(COLUMNS)
    return build_contexts(recs, events, catalog, attributions=att)


def test_contexts_carry_the_attributed_events_strongest_first(catalog):
    ctxs = _attributed_contexts(catalog, {(1, "b"): [("x", 0.2), ("a", 0.9), ("c", 0.01)], (2, "a"): [("d", 0.3)]})
    by_item = {r["item_id"]: r for r in ctxs[0].recommendations}
    assert [a["event"] for a in by_item["b"]["attributed"]] == ["E1", "E2"]  # 0.01 nats is no reason
    assert by_item["c"]["attributed"] == []
    assert ctxs[1].recommendations[0]["attributed"] == [{"event": "E2", "event_index": 0, "contribution": 0.3}]


def test_an_answer_citing_none_of_the_attributed_events_is_rejected_and_falls_back(catalog):
    ctxs = _attributed_contexts(catalog, {(1, "b"): [("a", 0.9)], (2, "a"): [("d", 0.3)]})
    with ScriptedLLM(["unfaithful", "unfaithful"]) as llm:
        ex = LLMExplainer(_config(llm))
        df = explain_batch(ctxs, ex)
    got = {(r["user_id"], r["item_id"]): r for r in df.iter_rows(named=True)}
    for key, event in (((1, "b"), "E1"), ((2, "a"), "E2")):
        assert got[key]["source"] == "fallback" and event in got[key]["evidence"], got[key]
    assert got[(1, "c")]["source"] == "llm"  # no attributions: nothing to be unfaithful to
    assert ex.stats.unfaithful == 4 and ex.stats.repairs == 2  # two items, asked twice each
    repairs = " ".join(r["body"]["messages"][-1]["content"] for r in llm.requests)
    assert "item b: evidence cites none of the events that made the model recommend it (E1)" in repairs
    with ScriptedLLM(["unfaithful"]) as llm:  # the check can be turned off
        df = explain_batch(ctxs, LLMExplainer(_config(llm, cite_attributed=0)))
    assert set(df["source"]) == {"llm"}
    with ScriptedLLM(["good"]) as llm:  # a faithful answer passes
        df = explain_batch(ctxs, LLMExplainer(_config(llm)))
    assert set(df["source"]) == {"llm"}
