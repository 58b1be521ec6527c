"""A user's explanation context: the facts a rationale may rest on, each with an id to cite.

Events are ``E1..En`` (the user's recent events, their last purchases, and the events the model's
attributions single out even when older); recommended items ``R1..Rk`` with catalog facts
(``R2.category``), computed statistics (``R2.times_7d``, ``R2.after_E7``, ``R2.popularity``;
:mod:`behaviorlm.explain.evidence`) and ``attributed`` -- the events that raised the model's
score for the item most, strongest first, with their contributions; profile facts are ``P.*``
(given ones such as ``P.segment`` and the computed ``P.usual_price``).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from behaviorlm.data.events import Events, EventsError, require_events
from behaviorlm.explain import evidence as ev_stats

MAX_TEXT = 80
MAX_RATIONALE = 300
ITEM_FACTS = ("title", "category", "brand", "price")
#: Keys of a recommendation that are not facts to cite (its identity, the model's own numbers).
NOT_FACTS = frozenset({"id", "item_id", "score", "rank", "attributed"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: Any) -> str | None:
    """Untrusted text -> one short line (control characters removed, length-limited)."""
    if value is None:
        return None
    text = _CONTROL.sub(" ", str(value)).strip()
    return text[:MAX_TEXT] if text else None


@dataclass
class UserContext:
    """Everything an explanation may rest on, with the ids the answer must cite."""

    user_id: Any
    events: list[dict[str, Any]]
    recommendations: list[dict[str, Any]]
    profile: dict[str, Any] = field(default_factory=dict)
    model_version: str = ""

    def fact_ids(self) -> set[str]:
        ids = {e["id"] for e in self.events}
        for r in self.recommendations:
            ids |= {f"{r['id']}.{k}" for k, v in r.items() if k not in NOT_FACTS and v is not None}
        return ids | {f"P.{k}" for k in self.profile}

    def item_ids(self) -> list[str]:
        return [str(r["item_id"]) for r in self.recommendations]

    def event(self, event_id: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["id"] == event_id), None)

    def attributed(self, rec: dict[str, Any], n: int | None = None) -> list[str]:
        """The ids of the events that raised ``rec``'s score most, strongest first (at most ``n``)."""
        ids = [a["event"] for a in rec.get("attributed", [])]
        return ids if n is None else ids[:n]

    def describe(self, fact_id: str) -> str:
        """A cited fact in words, for a reader who does not have the prompt: ``E19`` becomes
        ``E19: view of item 271696 at 2017-12-03 03:43``, ``R2.brand`` the brand of the second
        recommendation, ``R2.after_E7`` the share of people who went from E7's item to it."""
        e = self.event(fact_id)
        if e is not None:
            return f"{fact_id}: {e['action']} of item {e['item_id']} at {e['time']}"
        head, _, key = fact_id.partition(".")
        if head == "P" and key in self.profile:
            value = self.profile[key]
            return f"{fact_id}: {key} {ev_stats.money(value) if key == 'usual_price' else value}"
        for r in self.recommendations:
            if r["id"] == head and key in r and key not in NOT_FACTS:
                if isinstance(r[key], dict):
                    return f"{fact_id}: {ev_stats.describe_stat(key, r[key], r['item_id'])}"
                if key == "price" and isinstance(r[key], int | float):
                    return f"{fact_id}: price of item {r['item_id']} is {ev_stats.money(r[key])}"
                return f"{fact_id}: {key} of item {r['item_id']} is {r[key]}"
        return f"{fact_id}: (not in the context)"

    def to_prompt_data(self) -> dict[str, Any]:
        return {"events": self.events, "recommendations": self.recommendations, "profile": self.profile}


@dataclass
class Rationale:
    user_id: Any
    item_id: str
    rationale: str
    evidence: list[str]
    source: str  # "llm" | "fallback" | "template" | "cache"
    model_version: str = ""


def _item_attributes(items: pl.DataFrame | None, ids: Sequence[Any]) -> dict[str, dict[str, Any]]:
    if items is None or not len(ids):
        return {}
    cols = [c for c in ITEM_FACTS if c in items.columns]
    key = pl.Series("item_id", [str(i) for i in ids])
    rows = items.with_columns(pl.col("item_id").cast(pl.String)).join(key.to_frame(), on="item_id", how="semi")
    return {r["item_id"]: {c: r[c] for c in cols} for r in rows.iter_rows(named=True)}


def build_contexts(
    recommendations: pl.DataFrame,
    events: Events,
    items: pl.DataFrame | None = None,
    profiles: pl.DataFrame | None = None,
    n_events: int = 20,
    model_version: str = "",
    n_purchases: int = 5,
    attributions: pl.DataFrame | None = None,
    population: pl.DataFrame | None = None,
    n_attributed: int = 3,
) -> list[UserContext]:
    """One context per user in ``recommendations`` (``user_id, item_id, score, rank``).

    ``events`` are the users' own events (the most recent ``n_events`` are shown, plus their last
    ``n_purchases`` purchases and the top ``n_attributed`` attributed events of each
    recommendation); ``items`` the catalog; ``profiles`` optional per-user facts (e.g.
    ``propensity``, ``tier``, ``cluster``); ``attributions`` the event attributions of these
    recommendations (:mod:`behaviorlm.explain.attribution`'s columns); ``population`` the events
    the population statistics are counted over (``user_id, item_id, timestamp``; usually the
    model's remembered histories) -- without it, no population statistic is stated.
    """
    missing = {"user_id", "item_id", "score", "rank"} - set(recommendations.columns)
    if missing:
        raise EventsError(f"recommendations: missing column(s) {sorted(missing)}")
    ev = require_events(events, "build_contexts events").df
    users = recommendations["user_id"].unique(maintain_order=True)
    mine = ev.filter(pl.col("user_id").is_in(users.implode())).with_row_index("__r")
    top = ev_stats.top_attributed(attributions if attributions is not None else pl.DataFrame(), n_attributed)
    shown = _shown_events(mine, top, n_events, n_purchases)
    attrs = _item_attributes(
        items,
        pl.concat([shown["item_id"].cast(pl.String), recommendations["item_id"].cast(pl.String)]).unique().to_list(),
    )
    stats = _Statistics.of(mine, recommendations, top, population)
    by_user_ev = {u: g for (u,), g in shown.partition_by("user_id", as_dict=True).items()}
    prof = {}
    if profiles is not None:
        cols = [c for c in profiles.columns if c != "user_id"]
        prof = {r["user_id"]: {c: r[c] for c in cols if r[c] is not None} for r in profiles.iter_rows(named=True)}
    out = []
    for (user,), recs in (
        recommendations.sort("rank").partition_by("user_id", as_dict=True, maintain_order=True).items()
    ):
        evs = [
            _event_fact(i, r, attrs) for i, r in enumerate(by_user_ev.get(user, ev.clear()).iter_rows(named=True), 1)
        ]
        facts = [_rec_fact(i, r, attrs) for i, r in enumerate(recs.iter_rows(named=True), 1)]
        profile = {k: _profile_value(v) for k, v in prof.get(user, {}).items()}
        stats.attach(str(user), evs, facts, profile)
        out.append(UserContext(user, evs, facts, profile, model_version))
    return out


def _shown_events(mine: pl.DataFrame, top: pl.DataFrame, n_events: int, n_purchases: int) -> pl.DataFrame:
    """The user's events a context shows: the most recent, the last purchases even when older,
    and every top-attributed event wherever it lies in the window."""
    key = (pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), pl.col("event_type"), "timestamp")
    attributed = top.select(
        pl.col("user_id").alias("__u"),
        pl.col("event_item").alias("__i"),
        pl.col("event_action").alias("__a"),
        pl.col("event_time").alias("__t"),
    ).unique()
    keyed = mine.with_columns(*(k.alias(n) for k, n in zip(key[:3], ("__u", "__i", "__a"), strict=True)))
    keyed = keyed.with_columns(pl.col("timestamp").alias("__t"))
    picked = keyed.join(attributed, on=["__u", "__i", "__a", "__t"], how="semi").drop("__u", "__i", "__a", "__t")
    parts = [
        mine.group_by("user_id", maintain_order=True).tail(n_events),
        mine.filter(pl.col("event_type") == "purchase").group_by("user_id", maintain_order=True).tail(n_purchases),
        picked,
    ]
    shown = pl.concat([p.select(mine.columns) for p in parts])
    return shown.unique("__r").sort("user_id", "__r").drop("__r")


@dataclass
class _Statistics:
    """The computed facts of one batch of contexts, looked up per user while contexts are built."""

    top: dict[str, pl.DataFrame]  # per user (as text): their top attributed events
    touches: dict[tuple[str, str], dict[str, Any]]
    follows: dict[tuple[str, str], dict[str, int]]
    popular: dict[str, dict[str, int]]

    @classmethod
    def of(
        cls, mine: pl.DataFrame, recs: pl.DataFrame, top: pl.DataFrame, population: pl.DataFrame | None
    ) -> _Statistics:
        pairs = recs.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
        touches = {
            (u, i): {"n": n, "until": t.strftime("%Y-%m-%d")}
            for u, i, n, t in ev_stats.recent_touches(mine, pairs).iter_rows()
        }
        follows: dict[tuple[str, str], dict[str, int]] = {}
        popular: dict[str, dict[str, int]] = {}
        if population is not None and population.height:
            moves = top.filter(pl.col("event_item") != pl.col("item_id")).select(
                pl.col("event_item").alias("from_item"), pl.col("item_id").alias("to_item")
            )
            if moves.height:
                shares = ev_stats.follow_shares(population, moves)
                follows = {(a, b): {"users": u, "followed": f} for a, b, u, f in shares.iter_rows()}
            popular = {
                i: {"users": u, "of": of} for i, u, of in ev_stats.popularity(population, pairs["item_id"]).iter_rows()
            }
        by_user = {u: g for (u,), g in top.partition_by("user_id", as_dict=True).items()}
        return cls(by_user, touches, follows, popular)

    def attach(self, user: str, events: list[dict], recs: list[dict], profile: dict[str, Any]) -> None:
        """Add the statistics and attributions of ``user`` to its event, recommendation and
        profile facts (in place; ids of the events as numbered in ``events``)."""
        event_id = {(e["item_id"], e["action"], e["timestamp"]): e["id"] for e in events}
        mine = self.top.get(user)
        for r in recs:
            item = r["item_id"]
            if (user, item) in self.touches:
                r["times_7d"] = self.touches[(user, item)]
            if item in self.popular:
                r["popularity"] = self.popular[item]
            r["attributed"] = []
            if mine is None:
                continue
            for index, e_item, action, t, contribution, copy_w in (
                mine.filter(pl.col("item_id") == item)
                .select("event_index", "event_item", "event_action", "event_time", "contribution", "copy_weight")
                .iter_rows()
            ):
                eid = event_id.get((e_item, action, t))
                if eid is None:
                    continue
                found = {"event": eid, "event_index": index, "contribution": round(contribution, 4)}
                r["attributed"].append(found | _copy(copy_w))
                follow = self.follows.get((e_item, item))
                if follow and follow["users"]:
                    share = follow["followed"] / follow["users"]
                    r[f"after_{eid}"] = {"share": share, "users": follow["users"], "from": e_item}
        prices = [e["price"] for e in events if isinstance(e.get("price"), int | float)]
        if prices:
            profile["usual_price"] = round(statistics.median(prices), 2)
        for e in events:
            del e["timestamp"]  # the key above; the fact itself carries ``time``


def _copy(weight: float | None) -> dict[str, float]:
    return {} if weight is None else {"copy_weight": round(weight, 4)}


def _profile_value(v: Any) -> Any:
    return round(v, 3) if isinstance(v, float) else _clean(v)


def _event_fact(i: int, row: dict[str, Any], attrs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    a = attrs.get(str(row["item_id"]), {})
    fact = {"id": f"E{i}", "time": row["timestamp"].strftime("%Y-%m-%d %H:%M"), "action": row["event_type"]}
    fact["item_id"] = str(row["item_id"])
    fact |= {k: (_clean(a[k]) if k != "price" else a[k]) for k in ITEM_FACTS if a.get(k) is not None}
    return fact | {"timestamp": row["timestamp"]}  # removed once the attributions are matched


def _rec_fact(i: int, row: dict[str, Any], attrs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    a = attrs.get(str(row["item_id"]), {})
    fact = {
        "id": f"R{i}",
        "item_id": str(row["item_id"]),
        "score": round(float(row["score"]), 4),
        "rank": int(row["rank"]),
    }
    return fact | {k: (_clean(a[k]) if k != "price" else a[k]) for k in ITEM_FACTS if a.get(k) is not None}
