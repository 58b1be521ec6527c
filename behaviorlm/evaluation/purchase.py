"""Purchase-target evaluation: will the model put what the user buys next in its top k?

The next-event protocol (:func:`~behaviorlm.evaluation.splits.leave_one_out`) mostly asks for
the next *view*; a shop wants the next *purchase*. Here each buyer's last purchase is the test
target, the purchase before it validates, and the inputs of each are the user's events
*strictly before* the target's timestamp (a cart event in the same second as the purchase is
not input: it would give the answer away). Training data ends strictly before the validation
purchase (before the test purchase for users with one purchase), so neither target, nor
anything at or after it, is ever trained on.

The rules a shop already runs stand beside every model figure:

* ``cart`` -- "in your cart": the items the user carted and had not bought since, newest
  first, then their other recent items ("recently viewed"), then popularity;
* ``purchase_popularity`` -- the most bought items;
* ``purchase_cooccurrence`` -- what was bought next after the user's last item, counted over
  every training event and the next purchase after it.

Every figure is also split into "bought an item already in the history" and "bought a new
item" (:func:`~behaviorlm.evaluation.metrics.repeat_targets`): a stage may reorder the
user's own items, find new ones, or both.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from behaviorlm.data.events import Events, as_events
from behaviorlm.evaluation.baselines import PURCHASE
from behaviorlm.evaluation.splits import Holdout, Split, inputs_before

#: the baselines of this protocol, beside the next-event ones that still apply
PURCHASE_BASELINES = ("cart", "purchase_popularity", "purchase_cooccurrence", "recent", "repeat", "cooccurrence")


class ActionScorer:
    """A model's ranking for one next action (``P(item | next action = action)``), as a
    :class:`~behaviorlm.evaluation.baselines.Scorer`; anything with ``score(..., action=)``."""

    def __init__(self, model: Any, action: str = PURCHASE):
        self.model, self.action = model, action
        self.name = f"{getattr(model, 'name', 'model')}[{action}]"

    @property
    def training_data_(self) -> Any:  # the leak check reads the wrapped model's record
        return self.model.training_data_

    @property
    def time_context_(self) -> str:  # a request-time model is asked at each target's time
        return getattr(self.model, "time_context_", "history")

    def score(self, inputs: Events, users: list[Any], catalog: pl.Series, as_of: Any = None):
        if as_of is None:
            return self.model.score(inputs, users, catalog, action=self.action)
        return self.model.score(inputs, users, catalog, action=self.action, as_of=as_of)


def next_event_holdout(events: Events | Any, split: Split) -> Holdout:
    """The usual next-event task on a purchase split, without training on its targets: each
    evaluated user's first event strictly after their first purchase target's time (the
    training cut), with every event before that as input. What a purchase stage must not
    break: its model still predicts what people do next."""
    ev = as_events(events)
    targets = pl.concat([split.valid.targets, split.test.targets])
    cut = targets.group_by("user_id").agg(pl.col("timestamp").min().alias("__cut"))
    after = ev.df.join(cut, on="user_id", maintain_order="left").filter(pl.col("timestamp") > pl.col("__cut"))
    nxt = after.group_by("user_id", maintain_order=True).first().select(ev.df.columns)
    inputs, nxt = inputs_before(ev.df, nxt)
    return Holdout(ev.derive(inputs.select(ev.df.columns), "next-event inputs after the purchase cut"), nxt)
