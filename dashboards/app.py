"""Segment dashboard: ``make dashboard`` or ``behaviorlm dashboard`` (Streamlit).

Reads one date partition of the batch pipeline's outputs (see :mod:`dashboards.data`) and shows
KPIs, segment sizes, the propensity distribution with the tier thresholds, profiles, a
segment-vs-rest comparison, the embedding map, a user drill-down and a CSV export. Missing or
empty outputs give an on-page message saying what to run, never a stack trace.
"""

from __future__ import annotations

import sys
from pathlib import Path

import altair as alt
import polars as pl
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `streamlit run dashboards/app.py` from anywhere

from dashboards import data  # noqa: E402

PROFILE_METRICS = ["share", "mean_propensity", "mean_churn_propensity", "observed_conversion", "actions_per_user"]
ATTRIBUTED_STYLE = "background-color: #fff3bf"  # a soft highlight, readable in both themes


@st.cache_data(show_spinner="Loading the partition…")
def load(outputs: str, date: str) -> data.Partition:
    return data.load_partition(Path(outputs), date)


def main() -> None:
    st.set_page_config(page_title="behaviorlm segments", layout="wide")
    st.title("Segment dashboard")
    outputs = data.outputs_dir()
    try:
        dates = data.list_partitions(outputs)
        date = st.sidebar.selectbox("Date partition", dates)
        part = load(str(outputs), date)
    except data.DashboardDataError as e:
        st.warning(str(e))
        st.stop()
    table = data.user_table(part)
    by = st.sidebar.radio("Segment by", ["tier", "cluster"], horizontal=True)
    options = _segment_options(table, by)
    chosen = st.sidebar.multiselect("Segments", options, default=[])
    cats = st.sidebar.multiselect("Top category", data.categories(table), default=[])
    view = data.filter_users(table, by, chosen, cats)
    st.sidebar.caption(f"{view.height:,} of {table.height:,} users after filters")

    _kpi_cards(part, view)
    if view.height == 0:
        st.info("No user matches these filters; clear some filters in the sidebar.")
        st.stop()
    left, right = st.columns(2)
    with left:
        _segment_sizes(view, by)
    with right:
        _propensity_hist(view, part.tier_edges)
    _profiles(part, by)
    _segment_vs_rest(table, by, options)
    _embedding_map(view, by)
    _drill_down(part, view)
    _export(view, date)


def _segment_options(table: pl.DataFrame, by: str) -> list:
    values = table[by].unique().to_list()
    return [t for t in data.TIERS if t in values] if by == "tier" else sorted(values)


def _kpi_cards(part: data.Partition, view: pl.DataFrame) -> None:
    k = data.kpis(view)
    prov = part.provenance
    cols = st.columns(4)
    cols[0].metric("Users", f"{k['users']:,}")
    cols[1].metric(
        "Observed conversion",
        "n/a" if k["observed_conversion"] is None else f"{k['observed_conversion']:.1%}",
        help="share of these users with a purchase in their history up to the date",
    )
    cols[2].metric("Mean propensity", "n/a" if k["mean_propensity"] is None else f"{k['mean_propensity']:.3f}")
    cols[3].metric("Model", data.model_label(prov), help=prov.get("model_uri", ""))
    plan = part.meta.get("plan", {})
    st.caption(
        f"Date {part.date} · model {plan.get('model_version', '?')} · "
        f"propensity {plan.get('config', {}).get('method', '?')} over {plan.get('config', {}).get('horizon', '?')} · "
        f"outputs {part.folder}"
    )
    run = data.mlflow_run(prov.get("run_id"))
    if run:
        with st.expander("MLflow run that produced the model"):
            st.json(run, expanded=False)


def _colour(by: str, values: list, field: str | None = None) -> alt.Color:
    domain, colours = data.segment_colours(by, values)
    return alt.Color(f"{field or by}:N", title=by, scale=alt.Scale(domain=domain, range=colours))


def _segment_sizes(view: pl.DataFrame, by: str) -> None:
    st.subheader("Segment size and share")
    sizes = view.group_by(by).len().with_columns((pl.col("len") / pl.col("len").sum()).alias("share"))
    values = sizes[by].to_list()
    sizes = sizes.with_columns(pl.col(by).cast(pl.String))
    base = alt.Chart(sizes.to_pandas()).encode(
        x=alt.X(f"{by}:N", sort=data.segment_colours(by, values)[0], title=by),
        y=alt.Y("len:Q", title="users"),
        tooltip=[by, "len", alt.Tooltip("share:Q", format=".1%")],
    )
    bars = base.mark_bar().encode(color=_colour(by, values))
    labels = base.mark_text(dy=-6).encode(text=alt.Text("share:Q", format=".1%"))  # the share on every bar
    st.altair_chart(bars + labels, width="stretch")


def _propensity_hist(view: pl.DataFrame, edges: list[float] | None) -> None:
    st.subheader("Propensity distribution")
    base = alt.Chart(view.select("propensity", "tier").to_pandas())
    hist = base.mark_bar(opacity=0.8).encode(
        x=alt.X("propensity:Q", bin=alt.Bin(maxbins=40), title="P(purchase within horizon)"),
        y=alt.Y("count():Q", title="users"),
        color=_colour("tier", list(data.TIERS)),
    )
    layers = [hist]
    if edges:
        inner = [e for e in edges[1:-1]]
        rules = alt.Chart(pl.DataFrame({"threshold": inner}).to_pandas()).mark_rule(color="black", strokeDash=[4, 3])
        layers.append(rules.encode(x="threshold:Q", tooltip=["threshold"]))
        st.caption("Tier thresholds: " + ", ".join(f"{e:.3f}" for e in inner))
    st.altair_chart(alt.layer(*layers), width="stretch")


def _profiles(part: data.Partition, by: str) -> None:
    st.subheader("Segment profiles")
    prof = part.profiles.filter(pl.col("segment_type") == by)
    if prof.height == 0:
        st.info(f"No {by} profiles in this partition.")
        return
    metrics = [m for m in PROFILE_METRICS if m in prof.columns]
    long = prof.select("segment", *metrics).unpivot(index="segment", variable_name="metric")
    # colour by each metric scaled to [0, 1] across segments, label with the raw value
    long = long.with_columns(
        (
            (pl.col("value") - pl.col("value").min().over("metric"))
            / (pl.col("value").max() - pl.col("value").min()).over("metric")
        )
        .fill_nan(0.5)
        .alias("scaled")
    )
    base = alt.Chart(long.to_pandas()).encode(
        x=alt.X("metric:N", sort=metrics), y=alt.Y("segment:N", sort=prof["segment"].to_list())
    )
    heat = base.mark_rect().encode(color=alt.Color("scaled:Q", scale=alt.Scale(scheme="blues"), legend=None))
    text = base.mark_text().encode(text=alt.Text("value:Q", format=".3g"))
    st.altair_chart(heat + text, width="stretch")
    st.dataframe(prof.drop("segment_type").to_pandas(), hide_index=True, width="stretch")


def _segment_vs_rest(table: pl.DataFrame, by: str, options: list) -> None:
    st.subheader("Segment vs rest")
    if len(options) < 2:
        st.info("Only one segment: nothing to compare against.")
        return
    seg = st.selectbox("Compare segment", options, key="compare")
    st.dataframe(data.segment_vs_rest(table, by, seg).to_pandas(), hide_index=True, width="stretch")


def _embedding_map(view: pl.DataFrame, by: str) -> None:
    st.subheader("User embeddings (PCA)")
    mapped = view.filter(pl.col("cluster") >= 0).with_columns(pl.col(by).cast(pl.String).alias("segment"))
    if mapped.height == 0 or "pc1" not in mapped.columns:
        st.info("No embedding coordinates for these users.")
        return
    chart = (
        alt.Chart(mapped.select("user_id", "pc1", "pc2", "segment", "propensity").to_pandas())
        .mark_circle(size=30, opacity=0.7)
        .encode(
            x="pc1:Q",
            y="pc2:Q",
            color=_colour(by, view[by].unique().to_list(), "segment"),
            tooltip=["user_id", "segment", "propensity"],
        )
    )
    st.altair_chart(chart, width="stretch")


def _drill_down(part: data.Partition, view: pl.DataFrame) -> None:
    st.subheader("User drill-down")
    top = view.sort("propensity", descending=True)["user_id"].head(500).to_list()
    user = st.selectbox("User (highest propensity first)", top, key="user")
    row = view.filter(pl.col("user_id") == user).to_dicts()[0]
    st.write(
        f"**{user}** · tier {row['tier']} · cluster {row['cluster']} · propensity {row['propensity']:.3f}"
        + (f" · churn {row['churn_propensity']:.3f}" if row.get("churn_propensity") is not None else "")
    )
    detail = data.user_detail(part, user)
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("Recent events (highlighted: the events the model's attributions say made a recommendation)")
        _events_table(detail["events"])
    with c2:
        st.markdown("Recommendations")
        _table_or_note(detail["recommendations"], "No scores for this date (run the score step).")
    st.markdown("Rationales")
    _table_or_note(detail["rationales"], "No rationales: this partition has no recommendations or events for the user.")


def _events_table(events: pl.DataFrame | None) -> None:
    if events is None or events.height == 0:
        st.caption("No recent events stored for this partition.")
        return
    frame = events.to_pandas()
    styled = frame.style.apply(lambda row: [ATTRIBUTED_STYLE if row["explains"] else ""] * len(row), axis=1)
    st.dataframe(styled, hide_index=True, width="stretch")


def _table_or_note(df: pl.DataFrame | None, note: str) -> None:
    if df is None or df.height == 0:
        st.caption(note)
    else:
        st.dataframe(df.to_pandas(), hide_index=True, width="stretch")


def _export(view: pl.DataFrame, date: str) -> None:
    csv = view.drop([c for c in ("pc1", "pc2") if c in view.columns]).write_csv()
    st.download_button("Download filtered users (CSV)", csv, file_name=f"segments_{date}.csv", mime="text/csv")


main()
