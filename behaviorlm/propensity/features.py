"""Hand-made behavioural features for the gradient-boosting baselines and the seeds' heuristic.

Every builder takes an :class:`~behaviorlm.propensity.labels.ExampleSet` and returns one row per example
(``example_id`` first, in example order), computed only from that example's ``inputs`` and its
``as_of`` time -- the same evidence the transformer sees, so the comparison is fair.

* :func:`seed_features` -- the four counts the original prototype used.
* :func:`rfm_features` -- the direct-marketing classic: recency, frequency, monetary value and
  tenure of the target action (purchase days, as the BTYD models count them).
* :func:`rich_features` -- what a careful analyst would build: recency and tenure, frequency,
  inter-event gap statistics, per-action counts, ratios and recent-window counts (hours to
  quarters), sessions, repeat and cart-abandonment signals, item/category/brand diversity, price
  statistics and, where events carry them, amount and quantity statistics.
"""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl

from behaviorlm.propensity.labels import ExampleSet

SEED_FEATURES = ("sequence_length", "unique_actions", "cart_additions", "product_views")
ACTIONS = ("view", "add_to_cart", "add_to_favorites", "purchase")
SESSION_GAP_S = 1800.0
RECENT_WINDOWS_H = (1, 24, 72, 168, 720, 2160)  # an hour .. a quarter: clickstreams and purchase logs
DAY_S = 86400.0


def seed_features(ex: ExampleSet) -> pl.DataFrame:
    """``sequence_length, unique_actions, cart_additions, product_views`` per example.

    ``unique_actions`` is the number of distinct action types, as in the seeds.
    """
    agg = ex.inputs.group_by("example_id").agg(
        pl.len().cast(pl.Float64).alias("sequence_length"),
        pl.col("event_type").n_unique().cast(pl.Float64).alias("unique_actions"),
        (pl.col("event_type") == "add_to_cart").sum().cast(pl.Float64).alias("cart_additions"),
        (pl.col("event_type") == "view").sum().cast(pl.Float64).alias("product_views"),
    )
    return _align(ex, agg, fill=0.0)


def heuristic_score(seed: pl.DataFrame) -> np.ndarray:
    """The seeds' formula: ``min(1, 0.1 cart + 0.05 views + 0.3 unique_actions / length)``."""
    s = (
        0.1 * seed["cart_additions"]
        + 0.05 * seed["product_views"]
        + 0.3 * seed["unique_actions"] / seed["sequence_length"].clip(1)
    )
    return np.minimum(1.0, s.to_numpy())


def rfm_features(ex: ExampleSet, action: str = "purchase") -> pl.DataFrame:
    """Recency, frequency, monetary value and tenure of ``action`` per example (days).

    Frequency counts distinct days with the action after the first one, as the BTYD models do;
    monetary is the mean ``amount`` per action day (NaN without an amount column). An example
    without the action gets NaN recency and tenure and zero frequency.
    """
    df = ex.inputs.filter(pl.col("event_type") == action)
    df = df.join(ex.examples.select("example_id", "as_of"), on="example_id", how="left")
    amount = pl.col("amount").sum() if "amount" in df.columns else pl.lit(None, pl.Float64)
    # maintain_order: group order fixes the float summation order, so reruns give identical bits
    days = df.group_by("example_id", pl.col("timestamp").dt.truncate("1d").alias("day"), maintain_order=True).agg(
        pl.col("as_of").first(), amount.alias("value")
    )
    age = (pl.col("as_of") - pl.col("day")).dt.total_seconds(fractional=True) / DAY_S
    agg = days.group_by("example_id", maintain_order=True).agg(
        age.min().alias("rfm_recency_d"),
        (pl.len() - 1).cast(pl.Float64).alias("rfm_frequency"),
        pl.col("value").mean().alias("rfm_monetary"),
        age.max().alias("rfm_tenure_d"),
    )
    out = _align(ex, agg, fill=None)
    return out.with_columns(pl.col("rfm_frequency").fill_null(0.0))


def rich_features(ex: ExampleSet, items: pl.DataFrame | None = None) -> pl.DataFrame:
    """Recency/frequency/gaps/actions/sessions/diversity/price features per example (see module doc)."""
    df = _with_item_columns(ex, items)
    df = df.with_columns(
        ((pl.col("as_of") - pl.col("timestamp")).dt.total_seconds(fractional=True) / 3600).alias("age_h"),
        (pl.col("timestamp").diff().over("example_id").dt.total_seconds(fractional=True)).alias("gap_s"),
    ).with_columns((pl.col("gap_s") > SESSION_GAP_S).fill_null(True).cum_sum().over("example_id").alias("session"))
    aggs = [
        pl.len().cast(pl.Float64).alias("n_events"),
        pl.col("age_h").min().alias("recency_h"),
        pl.col("age_h").max().alias("tenure_h"),
        pl.col("item_id").n_unique().cast(pl.Float64).alias("n_items"),
        pl.col("session").max().cast(pl.Float64).alias("n_sessions"),
        pl.col("timestamp").dt.truncate("1d").n_unique().cast(pl.Float64).alias("active_days"),
        pl.col("gap_s").log1p().mean().alias("gap_log_mean"),
        pl.col("gap_s").log1p().std().alias("gap_log_std"),
        pl.col("gap_s").median().alias("gap_median_s"),
        pl.col("gap_s").max().alias("gap_max_s"),
        pl.col("gap_s").last().alias("gap_last_s"),
        (pl.col("session") == pl.col("session").max()).sum().cast(pl.Float64).alias("last_session_events"),
        pl.col("timestamp").last().dt.hour().cast(pl.Float64).alias("last_hour"),
        pl.col("timestamp").last().dt.weekday().cast(pl.Float64).alias("last_weekday"),
        pl.col("item_id").count().truediv(pl.col("item_id").n_unique()).alias("events_per_item"),
        pl.col("item_id")
        .value_counts(sort=True)
        .first()
        .struct.field("count")
        .cast(pl.Float64)
        .alias("max_item_events"),
    ]
    for a in ACTIONS:
        is_a = pl.col("event_type") == a
        aggs += [
            is_a.sum().cast(pl.Float64).alias(f"n_{a}"),
            is_a.mean().alias(f"share_{a}"),
            pl.col("age_h").filter(is_a).min().alias(f"since_{a}_h"),
            pl.col("item_id").filter(is_a).n_unique().cast(pl.Float64).alias(f"items_{a}"),
        ]
        for w in RECENT_WINDOWS_H:
            aggs.append((is_a & (pl.col("age_h") <= w)).sum().cast(pl.Float64).alias(f"n_{a}_{w}h"))
    for w in RECENT_WINDOWS_H:
        aggs.append((pl.col("age_h") <= w).sum().cast(pl.Float64).alias(f"n_events_{w}h"))
    carted = pl.col("item_id").filter(pl.col("event_type") == "add_to_cart")
    bought = pl.col("item_id").filter(pl.col("event_type") == "purchase")
    aggs.append(carted.is_in(bought.implode()).not_().sum().cast(pl.Float64).alias("cart_not_bought"))
    aggs += _metadata_aggs(df) + _value_aggs(df)
    agg = (
        df.group_by("example_id")
        .agg(aggs)
        .with_columns(
            (pl.col("n_events") / (pl.col("tenure_h") / 24 + 1)).alias("events_per_day"),
            (pl.col("n_events") / pl.col("n_sessions")).alias("events_per_session"),
            (pl.col("n_add_to_cart") / (pl.col("n_view") + 1)).alias("cart_per_view"),
            (pl.col("n_purchase") / (pl.col("n_add_to_cart") + 1)).alias("purchase_per_cart"),
            (pl.col("n_items") / pl.col("n_events")).alias("item_diversity"),
        )
    )
    return _align(ex, agg, fill=None)


def _with_item_columns(ex: ExampleSet, items: pl.DataFrame | None) -> pl.DataFrame:
    df = ex.inputs.join(ex.examples.select("example_id", "as_of"), on="example_id", how="left")
    if items is None:
        return df
    extra = [c for c in ("category", "brand", "price") if c in items.columns and c not in df.columns]
    if not extra:
        return df
    meta = items.select("item_id", *extra).with_columns(pl.col("item_id").cast(df["item_id"].dtype, strict=False))
    return df.join(meta, on="item_id", how="left", maintain_order="left")


def _metadata_aggs(df: pl.DataFrame) -> list[pl.Expr]:
    out = []
    for col in ("category", "brand"):
        if col in df.columns:
            out += [
                pl.col(col).n_unique().cast(pl.Float64).alias(f"n_{col}"),
                pl.col(col)
                .value_counts(sort=True)
                .first()
                .struct.field("count")
                .truediv(pl.len())
                .alias(f"top_{col}_share"),
            ]
    if "price" in df.columns:
        price = pl.col("price").cast(pl.Float64)
        out += [
            price.mean().alias("price_mean"),
            price.max().alias("price_max"),
            price.std().alias("price_std"),
            price.filter(pl.col("event_type") == "add_to_cart").mean().alias("price_cart_mean"),
            price.last().alias("price_last"),
        ]
    return out


def _value_aggs(df: pl.DataFrame) -> list[pl.Expr]:
    """Amount and quantity statistics (events that carry them: a purchase log's dollars and units)."""
    out = []
    for col in ("amount", "quantity"):
        if col in df.columns:
            v = pl.col(col)
            out += [
                v.sum().alias(f"{col}_sum"),
                v.mean().alias(f"{col}_mean"),
                v.max().alias(f"{col}_max"),
                v.std().alias(f"{col}_std"),
                v.last().alias(f"{col}_last"),
                v.first().alias(f"{col}_first"),
            ]
            out += [v.filter(pl.col("age_h") <= w).sum().alias(f"{col}_{w}h") for w in (720, 2160)]
    return out


def _align(ex: ExampleSet, agg: pl.DataFrame, fill: float | None) -> pl.DataFrame:
    """One row per example in example order; examples without inputs get ``fill``."""
    out = ex.examples.select("example_id").join(agg, on="example_id", how="left", maintain_order="left")
    return out.fill_null(fill) if fill is not None else out


def feature_matrix(frame: pl.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Float matrix (NaN for missing) and column names, ``example_id`` excluded."""
    cols = [c for c in frame.columns if c != "example_id"]
    return frame.select(pl.col(cols).cast(pl.Float64)).fill_nan(None).to_numpy().astype(np.float64), cols


class FeatureScaler:
    """Hand-made features made fit for a neural network: a signed ``log1p`` (counts and durations
    span orders of magnitude), then standardised with training statistics; missing values -> 0
    (the training mean). ``names_`` fixes the column order a saved model expects."""

    def fit(self, frame: pl.DataFrame) -> FeatureScaler:
        x, self.names_ = feature_matrix(frame)
        z = _signed_log(x)
        with warnings.catch_warnings():  # a feature missing everywhere (no views in a purchase log) is fine
            warnings.simplefilter("ignore", RuntimeWarning)
            self.mean_ = np.nan_to_num(np.nanmean(z, 0)) if len(z) else np.zeros(z.shape[1])
            self.scale_ = np.nan_to_num(np.nanstd(z, 0), nan=1.0) if len(z) else np.ones(z.shape[1])
        self.scale_[self.scale_ < 1e-9] = 1.0
        return self

    def transform(self, frame: pl.DataFrame) -> np.ndarray:
        missing = [c for c in self.names_ if c not in frame.columns]
        if missing:
            raise ValueError(f"feature columns differ from training; missing: {missing}")
        x, _ = feature_matrix(frame.select("example_id", *self.names_))
        return np.nan_to_num((_signed_log(x) - self.mean_) / self.scale_).astype(np.float32)

    def to_dict(self) -> dict:
        return {"names": self.names_, "mean": self.mean_.tolist(), "scale": self.scale_.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureScaler:
        s = cls()
        s.names_, s.mean_, s.scale_ = list(d["names"]), np.asarray(d["mean"]), np.asarray(d["scale"])
        return s


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))
