"""The offline explainer: rationales written from the context's facts, no network.

With attributions (:mod:`behaviorlm.explain.attribution`) the sentence leads with the event that
raised the model's score for the item most, says what the system counts about it (how often the
user touched the item this week; what share of people went from that event's item to this one;
a shared category or brand), adds the second attributed event, and compares the price with the
user's usual one. Without them (the model gave no event a positive part: the item is ranked
from the model's prior) it says how many people interacted with the item, and falls back to the
catalog matches the older template used. Every number is formatted by
:mod:`behaviorlm.explain.evidence` exactly as the cited fact's description writes it, and a
clause is added only whole, within :data:`~behaviorlm.explain.context.MAX_RATIONALE`.
"""

from __future__ import annotations

from typing import Any

from behaviorlm.explain import evidence as fmt
from behaviorlm.explain.context import MAX_RATIONALE, Rationale, UserContext

_DID = {
    "view": "viewed {}",
    "click": "clicked {}",
    "add_to_cart": "put {} in your cart",
    "cart": "put {} in your cart",
    "purchase": "bought {}",
    "buy": "bought {}",
    "add_to_favorites": "saved {}",
    "favorite": "saved {}",
    "remove_from_cart": "took {} out of your cart",
    "rate": "rated {}",
    "rating": "rated {}",
    "review": "reviewed {}",
    "like": "liked {}",
    "share": "shared {}",
    "search": "searched for {}",
}


def _did(action: str, what: str) -> str:
    """ "viewed X", "put X in your cart"; an action of the shop's own naming as a plain event."""
    return _DID.get(action, "had a " + action.replace("_", " ") + " event on {}").format(what)


def _name(fact: dict[str, Any], capital: bool = False) -> str:
    if fact.get("title"):
        return f'"{fact["title"]}"'
    return f"{'Item' if capital else 'item'} {fact['item_id']}"


def _at(event: dict[str, Any]) -> str:
    """The event's time as its fact writes it (minutes, UTC)."""
    return str(event["time"])


class TemplateExplainer:
    """Deterministic rationales from the context's facts; no network, the default."""

    source = "template"

    def explain(self, ctx: UserContext) -> list[Rationale]:
        return [self.explain_item(ctx, r) for r in ctx.recommendations]

    def explain_item(self, ctx: UserContext, rec: dict[str, Any]) -> Rationale:
        clauses = _attributed(ctx, rec) or _unattributed(ctx, rec)
        clauses += _price(ctx, rec)
        text, evidence = "", []
        for sentence, cited in clauses:
            if len(text) + len(sentence) + 1 > MAX_RATIONALE:
                break
            text = f"{text} {sentence}".strip()
            evidence += [c for c in cited if c not in evidence]
        return Rationale(ctx.user_id, rec["item_id"], text, evidence, self.source, ctx.model_version)


Clause = tuple[str, list[str]]


def _attributed(ctx: UserContext, rec: dict[str, Any]) -> list[Clause]:
    """Clauses from the events the model's attributions single out, strongest first."""
    ids = ctx.attributed(rec)
    if not ids:
        return []
    lead = ctx.event(ids[0])
    assert lead is not None  # attributed ids are the context's own events (build_contexts)
    out = [_repeat(rec, lead) if lead["item_id"] == rec["item_id"] else _move(rec, lead)]
    if len(ids) > 1:
        second = ctx.event(ids[1])
        assert second is not None
        what = "it" if second["item_id"] == rec["item_id"] else _name(second)
        out.append((f"It also weighs that you {_did(second['action'], what)} at {_at(second)}.", [second["id"]]))
    return out


def _repeat(rec: dict[str, Any], lead: dict[str, Any]) -> Clause:
    """The item itself is what the user touched: how often, and when last."""
    touches = rec.get("times_7d")
    did = _did(lead["action"], _name(rec))
    if touches and touches["n"] > 1:
        text = f"You {did} at {_at(lead)}, one of {fmt.count(touches['n'])} times in the 7 days to {touches['until']}."
        return text, [lead["id"], f"{rec['id']}.times_7d"]
    return f"You {did} at {_at(lead)}.", [lead["id"]]


def _move(rec: dict[str, Any], lead: dict[str, Any]) -> Clause:
    """Another item led to this one: the event, how many people made the same move, and a
    shared category or brand."""
    did = _did(lead["action"], _name(lead))
    text = f"{_name(rec, capital=True)} is suggested mainly because you {did} at {_at(lead)}"
    cited = [lead["id"]]
    follow = rec.get(f"after_{lead['id']}")
    if follow and follow["share"] > 0:
        users = fmt.count(follow["users"])
        text += f"; {fmt.share(follow['share'])} of the {users} people who interacted with it went on to this one"
        cited.append(f"{rec['id']}.after_{lead['id']}")
    for attr in ("category", "brand"):
        if rec.get(attr) is not None and lead.get(attr) == rec[attr]:
            text += f", and it shares its {attr} ({rec[attr]})"
            cited.append(f"{rec['id']}.{attr}")
            break
    return text + ".", cited


def _unattributed(ctx: UserContext, rec: dict[str, Any]) -> list[Clause]:
    """No event of the user raised the score materially: the user's own touches of the item, or
    how many people interacted with it (the model's prior), then a catalog match as a plain fact --
    never a claim that the user's history caused it."""
    name = _name(rec, capital=True)
    same = [e for e in ctx.events if e["item_id"] == rec["item_id"]]
    if same:
        return [_repeat(rec, same[-1])]
    out: list[Clause] = []
    pop = rec.get("popularity")
    if pop:
        text = (
            f"{name} is ranked high for most people rather than from your history: "
            f"{fmt.count(pop['users'])} of the {fmt.count(pop['of'])} people the model knows interacted with it."
        )
        out.append((text, [f"{rec['id']}.popularity"]))
    for attr in ("category", "brand"):
        hits = [e for e in ctx.events if rec.get(attr) is not None and e.get(attr) == rec[attr]]
        if hits:
            noun = "items" if len(hits) > 1 else "an item"
            subject = "It" if out else name
            text = f"{subject} shares the {attr} {rec[attr]} with {noun} you engaged with recently."
            return [*out, (text, [f"{rec['id']}.{attr}", *(e["id"] for e in hits[-3:])])]
    if out:
        return out
    if ctx.events:
        return [(f"{name} is ranked high for you by the recommender.", [ctx.events[-1]["id"]])]
    key = next((f"{rec['id']}.{k}" for k in ("title", "category") if rec.get(k) is not None), None)
    return [(f"{name} is among the most popular items right now.", [key] if key else [])]


def _price(ctx: UserContext, rec: dict[str, Any]) -> list[Clause]:
    """The item's price against the user's usual one -- for an item new to the user only."""
    usual, price = ctx.profile.get("usual_price"), rec.get("price")
    if any(e["item_id"] == rec["item_id"] for e in ctx.events):
        return []
    if not isinstance(usual, int | float) or not isinstance(price, int | float) or usual <= 0:
        return []
    where = "close to" if 0.8 <= price / usual <= 1.25 else ("above" if price > usual else "below")
    text = f"At {fmt.money(price)} it is {where} your usual {fmt.money(usual)}."
    return [(text, [f"{rec['id']}.price", "P.usual_price"])]
