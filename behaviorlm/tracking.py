"""MLflow glue: where runs go, the model as a pyfunc, and the champion/challenger promotion gate.

No business logic lives here -- the pyfunc only calls :class:`~behaviorlm.recommender.BehaviorLM`.

* :func:`tracking_uri` -- ``MLFLOW_TRACKING_URI`` when set, else a SQLite store inside the
  project (``data/mlflow/mlflow.db``, artifacts beside it): no server needed. To use a server,
  ``export MLFLOW_TRACKING_URI=http://mlflow.internal:5000``.
* :class:`BehaviorLMPyfunc` -- ``predict(DataFrame of user ids, or raw events)`` with
  ``params={"k", "exclude_seen"}`` returns ``user_id, item_id, score, rank``; with
  ``params={"adapter": "tier=High"}`` ranks with one of the model's low-rank adapters (they
  travel inside the logged model folder, each naming the base version it belongs to); with
  ``params={"format": "items"}`` one list of item ids per input row, the shape Spark's
  ``mlflow.pyfunc.spark_udf`` needs (see ``pipelines/spark_score.py``). Its artifacts are
  the saved model directory (weights, tokenizer vocabulary, id maps, config), loaded with
  ``weights_only`` torch loading -- no pickle of library objects.
* :func:`promote` -- a new registered version becomes ``champion`` only when its validation
  NDCG@10 is at least the current champion's minus a tolerance; otherwise ``challenger``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from behaviorlm import __version__
from behaviorlm.data.datasets import data_dir
from behaviorlm.data.io import atomic_dir
from behaviorlm.errors import ConfigurationError, InputDataError, ModelFormatError
from behaviorlm.model_dir import is_model_dir

MODEL_NAME = "behaviorlm"
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"
PREDICT_PARAMS: dict[str, Any] = {"k": 10, "exclude_seen": True, "format": "long", "explain": False, "adapter": ""}
EVENT_COLUMNS = ("user_id", "item_id", "event_type", "timestamp")
MODEL_DIR_ARTIFACT = "model_dir"  # the logged model folder, which the service and the batch job load


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a project-local SQLite store (created on demand)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = data_dir() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / 'mlflow.db'}"


def setup(experiment: str = "behaviorlm") -> str:
    """Point MLflow at :func:`tracking_uri` and an experiment whose artifacts stay in the project."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (data_dir() / "mlflow" / "artifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    return uri


try:  # the class must subclass PythonModel, but importing this module must not need mlflow
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency; this keeps the import cheap elsewhere
    _PythonModel = object  # type: ignore[misc,assignment]


class BehaviorLMPyfunc(_PythonModel):
    """MLflow wrapper: known users by id, or anyone from raw events."""

    def load_context(self, context: Any) -> None:
        from behaviorlm.inference.batch import set_threads
        from behaviorlm.recommender import BehaviorLM

        set_threads()
        self.model = BehaviorLM.load(context.artifacts[MODEL_DIR_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return predict_frame(self.model, model_input, params)


def predict_frame(model: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
    """What the pyfunc serves; separate so it is testable without MLflow."""
    import polars as pl

    p = PREDICT_PARAMS | dict(params or {})
    k, exclude_seen = int(p["k"]), bool(p["exclude_seen"])
    model = model.with_adapter(p["adapter"] or None)  # "" (the default): the base model
    if p["format"] not in ("long", "items"):
        raise InputDataError(
            f"params.format must be 'long' (user_id, item_id, score, rank) or 'items', got {p['format']!r}"
        )
    user_col = model.input_schema_.columns.user
    if not isinstance(model_input, pd.DataFrame) or not {"user_id", user_col} & set(model_input.columns):
        raise InputDataError(
            "model input must be a DataFrame with a 'user_id' column (plus event columns for raw events)"
        )
    events = _input_events(model, model_input)
    if events is not None:
        recs = model.recommend(events=events, k=k, exclude_seen=exclude_seen)
    else:
        users = model_input["user_id"].drop_duplicates().tolist()
        users = pl.Series(users).cast(model.user_id_dtype(), strict=False).to_list()
        recs = model.recommend(users, k=k, exclude_seen=exclude_seen)
    if p["format"] == "items":
        return _wide_items(recs, model_input["user_id" if "user_id" in model_input.columns else user_col], k)
    if p["explain"]:
        recs = _with_rationales(model, recs, events)
    return recs.to_pandas()


def _input_events(model: Any, model_input: pd.DataFrame) -> Any:
    """Raw events in the input, named as in the model's training data or canonically; else ``None``."""
    import polars as pl

    from behaviorlm.data.events import as_events

    schema = model.input_schema_
    trained = [
        c for c in (schema.columns.user, schema.columns.item, schema.columns.action, schema.columns.timestamp) if c
    ]
    if set(trained) <= set(model_input.columns):
        return model.validate_input(pl.from_pandas(model_input[trained]))
    if set(EVENT_COLUMNS) <= set(model_input.columns):
        return as_events(pl.from_pandas(model_input[list(EVENT_COLUMNS)]), schema=schema.canonical())
    return None


def _with_rationales(model: Any, recs: Any, events: Any) -> Any:
    """Add ``rationale, evidence, attributed, rationale_source``: an LLM endpoint if configured, else
    templates; ``attributed`` names the events (as ``evidence`` cites them) that raised the item's
    score most by occlusion."""
    import polars as pl

    from behaviorlm.explain import explain_batch, make_explainer
    from behaviorlm.explain.grounded import grounded_contexts

    history = events if events is not None else model.history_events()
    contexts = grounded_contexts(model, recs, history).contexts
    table = explain_batch(contexts, make_explainer()).select(
        pl.col("user_id").cast(pl.String).alias("__u"),
        pl.col("item_id").cast(pl.String).alias("__i"),
        "rationale",
        "evidence",
        "attributed",
        pl.col("source").alias("rationale_source"),
    )
    keys = [pl.col("user_id").cast(pl.String).alias("__u"), pl.col("item_id").cast(pl.String).alias("__i")]
    return recs.with_columns(keys).join(table, on=["__u", "__i"], how="left", maintain_order="left").drop("__u", "__i")


def _wide_items(recs: Any, users: pd.Series, k: int) -> pd.DataFrame:
    """One row per input row, columns ``rank_1..rank_k`` of item ids ("" when fewer than k).

    That is the shape ``mlflow.pyfunc.spark_udf(..., result_type="array<string>")`` turns
    into one array per row (it reads each row's columns as the array's elements).
    """
    import polars as pl

    lists = recs.group_by("user_id", maintain_order=True).agg(pl.col("item_id").cast(pl.String))
    by_user = dict(zip(lists["user_id"].cast(pl.String), lists["item_id"].to_list(), strict=True))
    rows = [(by_user.get(str(u), []) + [""] * k)[:k] for u in users]
    return pd.DataFrame(rows, columns=[f"rank_{i}" for i in range(1, k + 1)])


def log_model(model: Any, model_dir: str | Path, name: str = "model", registered_model_name: str | None = None):
    """Log a saved model directory as a pyfunc with signature and input example; optionally register."""
    import mlflow
    from mlflow.models import infer_signature

    users = model.histories_["user_id"].unique(maintain_order=True).head(2).to_list()
    example = pd.DataFrame({"user_id": users})
    output = predict_frame(model, example, {"k": 3})
    signature = infer_signature(example, output, params=PREDICT_PARAMS)
    if mlflow.active_run() is not None:  # which library wrote the run, beside the model's own manifest
        mlflow.set_tag("behaviorlm_version", __version__)
        if model.adapters_:  # logged inside the model folder; each belongs to this base version
            mlflow.set_tags(
                {"adapters": ",".join(sorted(model.adapters_)), "adapters_base_version": model.model_version}
            )
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=BehaviorLMPyfunc(),
        artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
        signature=signature,
        input_example=example,
        registered_model_name=registered_model_name,
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ("torch", "numpy", "polars", "pyarrow", "pandas", "mlflow")
    # behaviorlm reads every older model format, so any release from this one on can serve the model
    return [f"{p}=={version(p)}" for p in pkgs] + [f"behaviorlm>={__version__}"]


@dataclass
class PromotionDecision:
    version: str
    alias: str  # "champion" | "challenger"
    new_score: float
    champion_version: str | None
    champion_score: float | None
    tolerance: float
    reason: str = ""
    losing_to: tuple[str, ...] = ()

    def as_params(self) -> dict[str, Any]:
        return {f"promotion_{k}": v for k, v in self.__dict__.items()}


def promote(
    version: str,
    new_score: float,
    name: str = MODEL_NAME,
    metric: str = "val_ndcg_10",
    tolerance: float = 0.0,
    losing_to: dict[str, str] | None = None,
) -> PromotionDecision:
    """The promotion gate: ``champion`` when no baseline is significantly better on the held-out
    test (``losing_to``: each baseline that is, with the figure that says so) and ``new_score``
    is at least the current champion's less ``tolerance`` (or there is no champion); else
    ``challenger``. The decision says why in one sentence (``reason``).

    The score is also stored as a tag on the version, so the next decision can read the
    champion's without re-evaluating it.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    client.set_model_version_tag(name, version, metric, str(new_score))
    try:
        champ = client.get_model_version_by_alias(name, "champion")
        champ_version, champ_score = str(champ.version), float(champ.tags.get(metric, "nan"))
    except MlflowException:
        champ_version, champ_score = None, None
    if champ_version == str(version):  # this version is the champion already: judged against the others
        champ_version, champ_score = None, None
    has_champ = champ_score is not None and champ_score == champ_score
    beats_champ = not has_champ or new_score >= champ_score - tolerance  # type: ignore[operator]
    losing = dict(losing_to or {})
    if losing:
        reason = "not promoted: significantly worse than " + "; ".join(f"{b} ({why})" for b, why in losing.items())
    elif not beats_champ:
        reason = (
            f"not promoted: {metric} {new_score:.4f} is below the champion v{champ_version}'s {champ_score:.4f}"
            f" (tolerance {tolerance:g})"
        )
    else:
        than = (
            f"{metric} {new_score:.4f} >= champion v{champ_version}'s {champ_score:.4f}"
            if has_champ
            else "no champion yet"
        )
        reason = f"promoted: no baseline is significantly better on the held-out test, and {than}"
    alias = "champion" if beats_champ and not losing else "challenger"
    client.set_registered_model_alias(name, alias, version)
    return PromotionDecision(
        str(version), alias, new_score, champ_version, champ_score, tolerance, reason, tuple(losing)
    )


def version_aliases(name: str, version: str) -> list[str]:
    """The aliases a registered version holds now (e.g. ``["champion"]``)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return sorted(mlflow.MlflowClient().get_model_version(name, version).aliases)


def alias_version(name: str, alias: str) -> str:
    """The registry version an alias names now (what the service's hot reload polls)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)


def load_model_ref(
    ref: str, retrieval: str = "auto", engine: str = "torch", device: str = "auto", compile: bool = False
) -> tuple[Any, dict[str, Any]]:
    """A registry URI (``models:/name@alias`` or ``models:/name/3``) or a local model directory
    -> (BehaviorLM, provenance: ``model_uri``, ``run_id``, ``registry_version``).

    The batch job and the service load the same way, so both can say which model answered.
    ``retrieval``, ``engine``, ``device`` and ``compile`` are :meth:`BehaviorLM.use_retrieval`,
    :meth:`BehaviorLM.use_engine`, :meth:`BehaviorLM.use_device` and :meth:`BehaviorLM.use_compile`
    (compiled and warmed here, before anyone is answered). A registered version is
    loaded from its model-folder artifact with the project's own loader (weights only) -- never through
    ``mlflow.pyfunc.load_model``, which unpickles the version's ``python_model.pkl``: a version
    whose pickle runs code must not run it inside the service.
    """
    from behaviorlm.recommender import BehaviorLM

    if not str(ref).startswith("models:/"):
        model = BehaviorLM.load(ref, retrieval=retrieval, device=device).use_engine(engine, ref)
        provenance: dict[str, Any] = {"model_uri": str(Path(ref).resolve()), "run_id": None, "registry_version": None}
    else:
        folder, provenance = _registered_folder(ref)
        model = BehaviorLM.load(folder, retrieval=retrieval, device=device).use_engine(engine, folder)
    return (model.use_compile() if compile else model), provenance


def _registered_folder(ref: str) -> tuple[Path, dict[str, Any]]:
    """The model folder of a registered version, downloaded once into the project's cache
    (``data/cache/registry/NAME/VERSION``; the ANN index and ONNX export are written there too,
    never into the artifact store), and its provenance."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    name, _, alias = ref.removeprefix("models:/").partition("@")
    if alias:
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = name.partition("/")
        if not number:
            raise ConfigurationError(f"{ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        mv = client.get_model_version(name, number)
    version = str(mv.version)
    cache = data_dir() / "cache" / "registry" / name / version
    if not (cache / "MLmodel").is_file():
        with atomic_dir(cache) as tmp:  # a download cut short is never taken for a model
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
    folder = (cache / _model_dir_path(cache / "MLmodel")).resolve()
    if cache.resolve() not in folder.parents or not is_model_dir(folder):
        raise ModelFormatError(f"{ref} (version {version}) holds no behaviorlm model folder ({MODEL_DIR_ARTIFACT})")
    return folder, {"model_uri": ref, "run_id": mv.run_id, "registry_version": version}


def _model_dir_path(mlmodel: Path) -> str:
    """Where the pyfunc keeps the model-folder artifact, read from ``MLmodel`` (YAML, safely)."""
    import yaml  # type: ignore[import-untyped]  # a dependency of mlflow; no stubs installed

    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get(MODEL_DIR_ARTIFACT) or {}
    return str(entry.get("path", f"artifacts/{MODEL_DIR_ARTIFACT}"))
