"""The segments folder: the one owner of its on-disk layout, its completeness rule and its reading.

A segments folder (the batch job writes one per day, ``segments/date=YYYY-MM-DD/``; the CLI's
``propensity --save-dir`` and ``segment --out`` write one anywhere) holds::

    users.parquet             user table: user_id, propensity, churn_propensity, tier, cluster, pc1, pc2
    profiles.parquet          one row per tier and per cluster
    user_activity.parquet     per-user facts for dashboards; recent_events.parquet: latest events
    assigner.json             tier edges and cluster centres (labels users the run never saw)
    propensity/<column>/      saved propensity models (``propensity``, ``churn_propensity``)
    *.png                     figures
    _SUCCESS                  written last: what was computed (plan), the summary, the provenance

**Complete** means ``_SUCCESS`` exists; every reader (API, dashboard, CLI, pipelines) uses
:func:`is_complete` / :func:`resolve`, so they agree. A writer that recomputes a folder removes
``_SUCCESS`` first and the previous propensity models with it, so nothing of an older plan
outlives it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from behaviorlm.data.io import write_parquet_atomic, write_text_atomic
from behaviorlm.errors import ModelFormatError
from behaviorlm.segments.tiers import SegmentAssigner

if TYPE_CHECKING:
    from behaviorlm.propensity.estimator import PropensityModel

SUCCESS = "_SUCCESS"
USERS = "users.parquet"
PROFILES = "profiles.parquet"
ACTIVITY = "user_activity.parquet"
RECENT = "recent_events.parquet"
ASSIGNER = "assigner.json"
PROPENSITY = "propensity"


def day_folder(root: str | Path, date: str) -> Path:
    return Path(root) / f"date={date}"


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / SUCCESS).is_file()


def complete_dates(root: str | Path) -> list[str]:
    """Dates of the complete ``date=`` folders under ``root``, newest first."""
    days = [p.name.removeprefix("date=") for p in Path(root).glob("date=*") if is_complete(p)]
    return sorted(days, reverse=True)


def resolve(folder: str | Path) -> Path:
    """A complete segments folder itself, or the newest complete ``date=`` folder under a parent."""
    d = Path(folder)
    if is_complete(d):
        return d
    dates = complete_dates(d)
    if not dates:
        raise ModelFormatError(
            f"{d}: no complete segments folder (one with {SUCCESS}, or date=YYYY-MM-DD folders holding one)",
            cli_hint="run `python -m pipelines.batch_score --date YYYY-MM-DD ...`, "
            "`behaviorlm propensity --save-dir DIR` or `behaviorlm segment --out DIR` first",
        )
    return day_folder(d, dates[0])


def begin(folder: str | Path) -> Path:
    """Mark a folder incomplete before (re)writing it: ``_SUCCESS`` and old propensity models go."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    (d / SUCCESS).unlink(missing_ok=True)
    shutil.rmtree(d / PROPENSITY, ignore_errors=True)
    return d


def finish(folder: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``_SUCCESS`` (plan, summary, provenance): the folder is complete from now on."""
    return write_text_atomic(json.dumps(dict(record), indent=2, default=str), Path(folder) / SUCCESS)


def read_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / SUCCESS
    return json.loads(path.read_text()) if path.is_file() else None


def read_users(folder: str | Path) -> pl.DataFrame | None:
    """The user table of a complete folder; ``None`` when the folder is incomplete or has none."""
    d = Path(folder)
    return pl.read_parquet(d / USERS) if is_complete(d) and (d / USERS).exists() else None


def write_segmentation(
    folder: str | Path,
    tables: Mapping[str, pl.DataFrame],
    assigner: SegmentAssigner,
    bins: Sequence[float],
    metrics: Sequence[str],
) -> dict[str, Path]:
    """The user table, profiles, activity and recent events (``tables`` keyed ``users``,
    ``profiles``, ``activity``, ``recent_events``), the assigner and the figures of one run."""
    from behaviorlm import plots

    out = Path(folder)
    users, profiles = tables["users"], tables["profiles"]
    labelled = profiles.with_columns((pl.col("segment_type") + ":" + pl.col("segment")).alias("label"))
    mapped = users.filter(pl.col("cluster") >= 0)
    coords = mapped.select("pc1", "pc2").to_numpy()
    files = {
        "users": write_parquet_atomic(users, out / USERS),
        "profiles": write_parquet_atomic(profiles, out / PROFILES),
        "assigner": assigner.save(out / ASSIGNER),
        "user_segments": plots.user_segments(users, out / "user_segments.png", bins),
        "profile_heatmap": plots.profile_heatmap(labelled, out / "profile_heatmap.png", metrics, "label"),
        "embedding_map": plots.embedding_map(
            coords, mapped["cluster"].to_list(), out / "embedding_map.png", "User embeddings (PCA) by cluster"
        ),
        "embedding_map_tiers": plots.embedding_map(
            coords, mapped["tier"].to_list(), out / "embedding_map_tiers.png", "User embeddings (PCA) by tier"
        ),
    }
    for name, filename in (("activity", ACTIVITY), ("recent_events", RECENT)):
        if tables.get(name) is not None:
            files[name] = write_parquet_atomic(tables[name], out / filename)
    return files


def save_propensity_models(folder: str | Path, models: Mapping[str, PropensityModel]) -> dict[str, Path]:
    """Each model under ``propensity/<column>/`` (``propensity``, ``churn_propensity``)."""
    return {column: pm.save(Path(folder) / PROPENSITY / column) for column, pm in models.items()}


def save_propensity_folder(
    folder: str | Path, models: Mapping[str, PropensityModel], record: Mapping[str, Any]
) -> Path:
    """A complete folder of propensity models alone (``behaviorlm propensity --save-dir``), which
    ``serve --segments`` reads: marked incomplete, the models, then ``_SUCCESS`` with ``record``."""
    begin(folder)
    save_propensity_models(folder, models)
    return finish(folder, {"kind": "propensity", **record})


def output_files(folder: str | Path) -> list[Path]:
    """The data and figure files of a folder (not the markers), for logging as artifacts."""
    d = Path(folder)
    return sorted(p for p in d.iterdir() if p.suffix in (".parquet", ".png", ".json") and p.name[0] != "_")


@dataclass
class SegmentsFolder:
    """A complete segments folder, read: what the service needs to answer for known and new users."""

    folder: Path
    date: str
    record: dict[str, Any]
    models: dict[str, PropensityModel]
    users: pl.DataFrame | None = None
    assigner: SegmentAssigner | None = None
    by_user: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def horizon(self) -> str:
        return str(self.models["propensity"].params.get("horizon", "?"))

    @classmethod
    def load(cls, folder: str | Path, items: pl.DataFrame | None = None) -> SegmentsFolder:
        from behaviorlm.propensity.estimator import PropensityModel  # lightgbm and torch: only when serving

        d = resolve(folder)
        models = {
            p.name: PropensityModel.load(p, items)
            for p in sorted((d / PROPENSITY).glob("*"))
            if (p / "propensity.json").exists()
        }
        if "propensity" not in models:
            raise ModelFormatError(f"{d}: no saved propensity model under {PROPENSITY}/propensity")
        users = pl.read_parquet(d / USERS) if (d / USERS).exists() else None
        assigner = SegmentAssigner.load(d / ASSIGNER) if (d / ASSIGNER).exists() else None
        by_user = {str(r["user_id"]): r for r in users.iter_rows(named=True)} if users is not None else {}
        record = read_record(d) or {}
        date = d.name.removeprefix("date=") if d.name.startswith("date=") else str(record.get("date", d.name))
        return cls(d, date, record, models, users, assigner, by_user)
