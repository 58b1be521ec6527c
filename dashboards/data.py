"""What the segment dashboard reads and computes, kept apart from Streamlit so it can be tested.

Inputs are the batch pipeline's outputs under one folder (default ``data/outputs``, or
``$BEHAVIORLM_OUTPUTS``)::

    segments/date=D/users.parquet          user_id, propensity, churn_propensity, tier, cluster, pc1, pc2
    segments/date=D/profiles.parquet       one row per tier and per cluster
    segments/date=D/user_activity.parquet  n_events, n_purchases, first/last_seen, top_category
    segments/date=D/recent_events.parquet  each user's latest events
    segments/date=D/assigner.json          tier edges, cluster centres
    segments/date=D/_SUCCESS               plan, summary, provenance (model URI, registry version, run)
    scores/date=D/part-*.parquet           top-K recommendations
    rationales/date=D.parquet              optional, from the pipeline's explain step
    attributions/date=D.parquet            optional, the explain step's event contributions

Every loader raises :class:`DashboardDataError` with a sentence a person can act on; the app
shows it instead of a stack trace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from behaviorlm.segments import store
from behaviorlm.segments.tiers import SegmentAssigner

DEFAULT_OUTPUTS = Path("data/outputs")
TIERS = ("Low", "Medium", "High")
#: One colour per tier, the same in every chart (a low-to-high ramp)
TIER_COLOURS = ("#9ecae1", "#4292c6", "#08306b")
CLUSTER_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6")


def segment_colours(by: str, values: list[Any]) -> tuple[list[str], list[str]]:
    """(domain, colours) for segments of kind ``by``: every chart that colours by a segment uses
    this, so a tier or a cluster has one colour on the page (the histogram and the map agreed
    on nothing before). Tiers in their order; clusters by id, cycling eight colours."""
    if by == "tier":
        return list(TIERS), list(TIER_COLOURS)
    domain = [str(v) for v in sorted(set(values), key=lambda v: (str(type(v)), v))]
    return domain, [CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)] for i in range(len(domain))]


def model_label(provenance: dict[str, Any]) -> str:
    """The model as the registry knows it: ``behaviorlm v1 @champion``; ``local folder`` only when
    the model was not registered."""
    version = provenance.get("registry_version")
    if not version:
        return "local folder"
    uri = str(provenance.get("model_uri", ""))
    name = provenance.get("model_name") or uri.removeprefix("models:/").split("@")[0].split("/")[0] or "model"
    aliases = provenance.get("aliases") or ([uri.split("@", 1)[1]] if "@" in uri else [])
    return f"{name} v{version}" + "".join(f" @{a}" for a in aliases)


class DashboardDataError(Exception):
    """Missing or unusable pipeline outputs, explained."""


def outputs_dir() -> Path:
    return Path(os.environ.get("BEHAVIORLM_OUTPUTS", DEFAULT_OUTPUTS))


def list_partitions(outputs: Path) -> list[str]:
    """Dates with a complete segments folder, newest first."""
    seg = outputs / "segments"
    if not seg.is_dir():
        raise DashboardDataError(
            f"No segment outputs under {seg}. Run the batch job first, e.g. "
            "`python -m pipelines.batch_score --date YYYY-MM-DD --dataset taobao`, "
            "or point BEHAVIORLM_OUTPUTS at another outputs folder."
        )
    days = store.complete_dates(seg)
    if not days:
        raise DashboardDataError(f"{seg} has no complete date=YYYY-MM-DD folder (one with {store.SUCCESS}) yet.")
    return days


@dataclass
class Partition:
    date: str
    folder: Path
    users: pl.DataFrame
    profiles: pl.DataFrame
    activity: pl.DataFrame | None
    recent: pl.DataFrame | None
    scores: pl.DataFrame | None
    rationales: pl.DataFrame | None
    attributions: pl.DataFrame | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tier_edges: list[float] | None = None
    figures: dict[str, Path] = field(default_factory=dict)

    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta.get("provenance", {})


def load_partition(outputs: Path, date: str) -> Partition:
    folder = store.day_folder(outputs / "segments", date)
    users = _read(folder / store.USERS, required=True)
    if users.height == 0:
        raise DashboardDataError(f"{folder / 'users.parquet'} is empty: the batch run scored no users for {date}.")
    missing = {"user_id", "propensity", "tier", "cluster"} - set(users.columns)
    if missing:
        raise DashboardDataError(f"{folder / 'users.parquet'} lacks columns {sorted(missing)}; rerun the batch job.")
    meta = store.read_record(folder) or {}
    assigner = folder / store.ASSIGNER
    edges = SegmentAssigner.load(assigner).edges if assigner.exists() else None
    parts = sorted((outputs / "scores" / f"date={date}").glob("part-*.parquet"))
    return Partition(
        date=date,
        folder=folder,
        users=users,
        profiles=_read(folder / store.PROFILES, required=True),
        activity=_read(folder / store.ACTIVITY),
        recent=_read(folder / store.RECENT),
        scores=pl.read_parquet(parts) if parts else None,
        rationales=_read(outputs / "rationales" / f"date={date}.parquet"),
        attributions=_read(outputs / "attributions" / f"date={date}.parquet"),
        meta=meta,
        tier_edges=edges,
        figures={p.stem: p for p in folder.glob("*.png")},
    )


def _read(path: Path, required: bool = False) -> pl.DataFrame | None:
    if not path.exists():
        if required:
            raise DashboardDataError(f"{path} is missing: the batch run for this date did not finish.")
        return None
    try:
        return pl.read_parquet(path)
    except Exception as e:  # a truncated or foreign file: say which
        raise DashboardDataError(f"{path} cannot be read ({type(e).__name__}: {e}).") from None


def user_table(p: Partition) -> pl.DataFrame:
    """Users joined with their activity (when the batch run wrote it)."""
    if p.activity is None:
        return p.users
    return p.users.join(p.activity, on="user_id", how="left")


def categories(table: pl.DataFrame) -> list[str]:
    if "top_category" not in table.columns:
        return []
    return table["top_category"].drop_nulls().value_counts(sort=True)["top_category"].head(50).to_list()


def filter_users(table: pl.DataFrame, by: str, segments: list[Any] | None, cats: list[str] | None) -> pl.DataFrame:
    out = table
    if segments:
        out = out.filter(pl.col(by).is_in(segments))
    if cats and "top_category" in out.columns:
        out = out.filter(pl.col("top_category").is_in(cats))
    return out


def kpis(table: pl.DataFrame) -> dict[str, Any]:
    """Users, mean propensity and the share who purchased in their history (when known)."""
    out: dict[str, Any] = {"users": table.height, "mean_propensity": _mean(table, "propensity")}
    out["observed_conversion"] = (
        float((table["n_purchases"] > 0).mean()) if "n_purchases" in table.columns and table.height else None
    )
    out["mean_churn_propensity"] = _mean(table, "churn_propensity")
    return out


def _mean(table: pl.DataFrame, col: str) -> float | None:
    return float(table[col].mean()) if col in table.columns and table.height else None


def segment_vs_rest(table: pl.DataFrame, by: str, segment: Any) -> pl.DataFrame:
    """Mean of each numeric column inside the segment, outside it, and the ratio."""
    numeric = [
        c
        for c, t in table.schema.items()
        if t.is_numeric() and c not in ("user_id", "cluster", "pc1", "pc2") and c != by
    ]
    inside = table.filter(pl.col(by) == segment)
    rest = table.filter(pl.col(by) != segment)
    rows = []
    for c in numeric:
        a, b = inside[c].mean(), rest[c].mean()
        rows.append({"metric": c, "segment": a, "rest": b, "ratio": (a / b) if a is not None and b else None})
    return pl.DataFrame(
        rows, schema={"metric": pl.String, "segment": pl.Float64, "rest": pl.Float64, "ratio": pl.Float64}
    )


def user_detail(p: Partition, user_id: Any) -> dict[str, pl.DataFrame | None]:
    """One user's recent events, recommendations and rationales (each ``None`` when not produced)."""

    def pick(df: pl.DataFrame | None) -> pl.DataFrame | None:
        if df is None:
            return None
        return df.filter(pl.col("user_id").cast(pl.String) == str(user_id))

    mine_scores, mine_events = pick(p.scores), pick(p.recent)
    recs = None if mine_scores is None else mine_scores.sort("rank").select("rank", "item_id", "score")
    events = None if mine_events is None else mine_events.sort("timestamp", descending=True).drop("user_id")
    if events is not None:
        events = with_attributions(events, pick(p.attributions))
    rationales = pick(p.rationales)
    if (rationales is None or rationales.height == 0) and recs is not None and recs.height and events is not None:
        rationales = template_rationales(mine_scores, mine_events)  # the explain step covers a sample only
    if rationales is not None:
        rationales = rationales.select(
            [c for c in ("item_id", "rationale", "evidence_facts", "evidence", "source") if c in rationales.columns]
        )
    return {"events": events, "recommendations": recs, "rationales": rationales}


def with_attributions(events: pl.DataFrame, attributions: pl.DataFrame | None) -> pl.DataFrame:
    """The user's events with ``explains``: the recommended items this event raised materially
    (the explain step's occlusion attributions, at least ``MIN_CONTRIBUTION`` nats), strongest
    first, and ``contribution``, its largest part -- null for events that explain nothing (or
    when the explain step did not cover the user)."""
    from behaviorlm.explain.evidence import MIN_CONTRIBUTION

    if attributions is None or attributions.height == 0:
        return events.with_columns(
            pl.lit(None, pl.String).alias("explains"), pl.lit(None, pl.Float64).alias("contribution")
        )
    material = attributions.filter(pl.col("contribution") >= MIN_CONTRIBUTION).sort("contribution", descending=True)
    per_event = material.group_by(
        pl.col("event_item").cast(pl.String).alias("__i"),
        pl.col("event_action").alias("__a"),
        pl.col("event_time").alias("__t"),
        maintain_order=True,
    ).agg(pl.col("item_id").cast(pl.String).str.join(", ").alias("explains"), pl.col("contribution").max())
    keyed = events.with_columns(
        pl.col("item_id").cast(pl.String).alias("__i"),
        pl.col("event_type").alias("__a"),
        pl.col("timestamp").alias("__t"),
    )
    return keyed.join(per_event, on=["__i", "__a", "__t"], how="left", maintain_order="left").drop("__i", "__a", "__t")


def template_rationales(recs: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    """Offline, deterministic rationales grounded in the user's stored recent events."""
    from behaviorlm.data.events import Events
    from behaviorlm.explain import TemplateExplainer, build_contexts, explain_batch

    stored = Events.trusted(events, "recent events stored by the batch run")
    contexts = build_contexts(recs.select("user_id", "item_id", "score", "rank"), stored)
    return explain_batch(contexts, TemplateExplainer())


def mlflow_run(run_id: str | None) -> dict[str, Any] | None:
    """Parameters and metrics of the MLflow run named in the partition's provenance, if reachable."""
    if not run_id:
        return None
    try:
        import mlflow

        from behaviorlm.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        run = mlflow.get_run(run_id)
    except Exception as e:  # no store here, another server, a deleted run: say so, don't crash
        return {
            "error": f"run {run_id} not readable from {os.environ.get('MLFLOW_TRACKING_URI', 'the local store')}: {e}"
        }
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "metrics": dict(run.data.metrics),
        "params": dict(run.data.params),
    }
