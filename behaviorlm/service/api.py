"""Recommendation service: FastAPI over a fitted model (``behaviorlm serve``).

Endpoints: ``GET /health`` (liveness), ``GET /ready`` (model loaded, which one),
``POST /v1/recommend``, ``/v1/next-actions``, ``/v1/propensity``, ``/v1/segment``; OpenAPI
docs at ``/docs``. Every ``/v1`` body names a user either by ``user_id`` (someone the model saw
in training) or by ``events`` (their recent raw events; anyone).

Design notes:

* The model loads once, in the background at start-up (registry alias or local folder):
  ``/health`` answers at once, ``/ready`` and ``/v1`` are 503 until it is loaded (or say why
  it failed).
* Plain recommendations go through :class:`~behaviorlm.service.online.MicroBatcher`: one worker thread
  owns the forward pass and batches whatever requests are waiting, so the event loop never
  blocks on torch and throughput rises with concurrency. Explanations, decoding and propensity
  run in the thread pool, so a slow LLM never delays a plain call.
* Propensity and segments come from a batch pipeline's day folder
  (``data/outputs/segments/date=D``): known users get the batch figures, raw-event requests
  are scored online with the propensity models and tier edges / cluster centres saved there.
* Limits: ``k``, events per request, string lengths, list sizes and the body size are bounded;
  a malformed request gets a 4xx whose message names the field. An API key is required when
  ``BEHAVIORLM_API_KEY`` is set (header ``X-API-Key`` or ``Authorization: Bearer``).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from behaviorlm.data.events import Events, validate_schema
from behaviorlm.data.schema import InputSchema
from behaviorlm.data.timestamps import (
    PY_MAX_MICROS,
    PY_MIN_MICROS,
    UTC,
    parse_timestamps,
    plausible_window,
)
from behaviorlm.errors import BehaviorLMError, InputDataError
from behaviorlm.extras import missing_extra
from behaviorlm.segments.store import SegmentsFolder
from behaviorlm.service.metrics import ServiceMetrics
from behaviorlm.service.online import MicroBatcher, OnlineRecommender
from behaviorlm.service.rank_cache import DEFAULT_ENTRIES
from behaviorlm.service.reload import RegistryWatcher
from behaviorlm.service.request_events import RequestEncoder

try:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response
except ImportError as exc:  # the service is an extra: say which, not a bare ModuleNotFoundError
    raise missing_extra("serve", "the HTTP service (behaviorlm serve)", exc) from exc

log = logging.getLogger("behaviorlm.service.api")

MAX_K = 100
MAX_EVENTS = 1000
MAX_ALLOWED_ITEMS = 10_000
MAX_BODY_BYTES = 1 << 20
MAX_ID_CHARS = 128
API_KEY_ENV = "BEHAVIORLM_API_KEY"
VERSION_HEADER = "X-Model-Version"

Id = int | Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


# ---------------------------------------------------------------- request / response schemas
# strict: JSON true is not the integer 1, "5" is not k=5, 1 is not a boolean
STRICT = ConfigDict(extra="forbid", strict=True)


class EventIn(BaseModel):
    """One raw event of the requesting user."""

    model_config = STRICT
    item_id: Id | None = Field(None, description="required unless the model was trained on an event-only log")
    event_type: Annotated[str, Field(min_length=1, max_length=64)]
    timestamp: Annotated[str, Field(min_length=1, max_length=64)] | Annotated[float, Field(allow_inf_nan=False)] = (
        Field(
            description="ISO-8601 time (UTC if no offset) or a unix time whose unit (s, ms, us, ns) is read from "
            "its magnitude, as for files; times before 1990 or after tomorrow are refused unless the model "
            "was trained with them allowed"
        )
    )


class UserInput(BaseModel):
    """Who to answer for: a known ``user_id``, or raw ``events`` (optionally with a ``user_id`` label)."""

    model_config = STRICT
    user_id: Id | None = None
    events: Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENTS)] | None = None

    @model_validator(mode="after")
    def _needs_someone(self) -> UserInput:
        if self.user_id is None and self.events is None:
            raise ValueError("give 'user_id' (a known user) or 'events' (recent raw events)")
        return self


_EVENTS_EXAMPLE: list[Any] = [
    {"item_id": "1", "event_type": "view", "timestamp": "2024-05-01T10:00:00Z"},
    {"item_id": "2", "event_type": "add_to_cart", "timestamp": "2024-05-01T10:03:00Z"},
]


class RecommendRequest(UserInput):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"user_id": "42", "k": 10}, {"events": _EVENTS_EXAMPLE, "k": 5}]},
    )
    k: Annotated[int, Field(ge=1, le=MAX_K)] = 10
    exclude_seen: bool | None = Field(None, description="default: what the model was trained/evaluated with")
    allowed_items: Annotated[list[Id], Field(min_length=1, max_length=MAX_ALLOWED_ITEMS)] | None = None
    explain: bool = Field(False, description="add grounded rationales (slower; LLM if configured, else templates)")
    adapter: str | None = Field(None, description="rank with this low-rank adapter of the model, e.g. 'tier=High'")


class ItemOut(BaseModel):
    item_id: Id
    score: float
    rank: int


class AttributedEventOut(BaseModel):
    """One of the user's events and how much it raised the item's score (occlusion, nats)."""

    event: str  # the id the rationale's evidence cites (E1..En)
    event_index: int  # position among the user's events, oldest 0
    item_id: str
    action: str
    timestamp: datetime
    contribution: float
    copy_weight: float | None = None


class RationaleOut(BaseModel):
    item_id: str
    rationale: str
    evidence: list[str]
    source: str
    attributed: list[AttributedEventOut] = []


class RecommendResponse(BaseModel):
    user_id: Id | None
    model_version: str
    cold_start: bool
    items: list[ItemOut]
    rationales: list[RationaleOut] | None = None


class NextActionsRequest(UserInput):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"user_id": "42", "method": "sample", "n_steps": 3, "top_p": 0.9}]},
    )
    method: Literal["greedy", "sample", "beam"] = "greedy"
    n_steps: Annotated[int, Field(ge=1, le=20)] = 3
    temperature: Annotated[float, Field(gt=0, le=10)] = 1.0
    top_k: Annotated[int, Field(ge=1, le=10_000)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    beam_width: Annotated[int, Field(ge=1, le=16)] = 5
    n_samples: Annotated[int, Field(ge=1, le=16)] = 1
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0


class StepOut(BaseModel):
    trajectory: int
    step: int
    action: str
    item_id: Id
    step_logprob: float
    logprob: float


class NextActionsResponse(BaseModel):
    user_id: Id | None
    model_version: str
    action_probabilities: dict[str, float]
    steps: list[StepOut]


class PropensityRequest(UserInput):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{"user_id": "42"}]})


class PropensityResponse(BaseModel):
    user_id: Id | None
    model_version: str
    propensity: float = Field(description="calibrated P(purchase within the horizon)")
    churn_propensity: float | None
    horizon: str
    as_of: str
    source: Literal["batch", "online"]


class SegmentResponse(PropensityResponse):
    tier: str
    cluster: int
    segments_date: str


# ---------------------------------------------------------------- service state
@dataclass
class Serving:
    """One loaded model version and everything that answers for it.

    A hot reload builds a new one beside the old and swaps it in whole, so a request that
    started on one version finishes on it: routes take it once (:meth:`ServiceState.hold`) and
    the old version's batcher closes only when the last of its requests has left.
    """

    model: Any
    online: OnlineRecommender
    batcher: MicroBatcher
    encoder: RequestEncoder
    provenance: dict[str, Any]
    segments: SegmentsFolder | None
    loaded_at: str
    inflight: int = 0
    retired: bool = False
    #: per adapter, its own recommender (merged weights, cached user states) and batcher, built on first use
    adapted: dict[str, tuple[OnlineRecommender, MicroBatcher]] = field(default_factory=dict)
    _adapting: threading.Lock = field(default_factory=threading.Lock)

    @property
    def version(self) -> str:
        reg = self.provenance.get("registry_version")
        return f"{self.model.model_version}" + (f" (registry v{reg})" if reg else "")

    def route(self, adapter: str) -> tuple[OnlineRecommender, MicroBatcher]:
        """The recommender and batcher that answer with ``adapter``; an unknown name is a 422
        naming the model's adapters."""
        if adapter not in self.model.adapters_:
            raise HTTPException(
                422, f"field 'adapter': unknown adapter {adapter!r}; this model has: {sorted(self.model.adapters_)}"
            )
        with self._adapting:  # one build per adapter, however many requests ask at once
            if adapter not in self.adapted:
                cache = self.online.ranks_.max_entries
                online = OnlineRecommender.from_model(self.model.with_adapter(adapter), cache)
                batcher = MicroBatcher(online.recommend, max_batch=self.batcher.max_batch, name=f"recommend-{adapter}")
                self.adapted[adapter] = (online, batcher)
            return self.adapted[adapter]

    def close(self, wait: bool = True) -> None:
        """Close every batcher of this version (the base model's and each adapter's)."""
        for batcher in (self.batcher, *(b for _, b in self.adapted.values())):
            batcher.close(wait=wait)


@dataclass
class ServiceState:
    current: Serving | None = None
    explainer: Any = None
    load_error: str | None = None
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    watcher: RegistryWatcher | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def hold(self, response: Response) -> Iterator[Serving]:
        """The current version for the span of one request (503 while none is loaded), named in
        the response's version header."""
        with self._lock:
            serving = self.current
            if serving is None:
                raise HTTPException(503, _not_ready(self))
            serving.inflight += 1
        response.headers[VERSION_HEADER] = serving.version
        try:
            yield serving
        finally:
            with self._lock:
                serving.inflight -= 1
                last_out = serving.retired and serving.inflight == 0
            if last_out:
                serving.close(wait=False)

    def swap(self, new: Serving) -> Serving | None:
        """Make ``new`` current; the old version retires once its requests have finished."""
        with self._lock:
            old, self.current = self.current, new
            if old is not None:
                old.retired = True
            idle = old is not None and old.inflight == 0
        if idle:
            old.close(wait=False)  # type: ignore[union-attr]
        self.metrics.model_loaded(new.version, old.version if old else None)
        return old


# ---------------------------------------------------------------- app factory
def create_app(
    model: Any,
    segments: str | Path | None = None,
    api_key: str | None = None,
    max_batch: int = 32,
    max_body_bytes: int = MAX_BODY_BYTES,
    threads: int = 1,
    reload_interval: float | None = None,
    retrieval: str = "auto",
    engine: str = "torch",
    rank_cache: int = DEFAULT_ENTRIES,
    device: str = "auto",
    compile: bool = False,
) -> FastAPI:
    """The service for ``model``: a fitted ``BehaviorLM``, a local model folder, or ``models:/...``.

    ``api_key=None`` reads ``BEHAVIORLM_API_KEY``; an empty key means no authentication.
    ``threads`` is torch's intra-op pool: one by default, because the event loop needs the other
    core of a 2-core box and idle pool threads spin-wait on it (benchmarks/RESULTS.md section 8).
    ``reload_interval`` (seconds; registry aliases only) polls the alias and hot-swaps the model
    when it moves. ``retrieval`` (auto | exact | ann) and ``engine`` (torch | onnx | onnx-int8)
    say how a loaded model ranks and runs (:meth:`BehaviorLM.use_retrieval`, :meth:`~BehaviorLM.use_engine`).
    ``rank_cache``: known users' ranked lists kept per model version (:mod:`behaviorlm.service.rank_cache`; 0: off).
    ``device``: where the model scores (:meth:`BehaviorLM.use_device`; ``auto``: a GPU when present).
    ``compile``: the forward through ``torch.compile``, compiled before the service reports ready
    (:meth:`BehaviorLM.use_compile`; a model object given here is used as it is).
    """
    state = ServiceState()
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    load = functools.partial(
        _load_serving, segments=segments, max_batch=max_batch, metrics=state.metrics, rank_cache=rank_cache
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # load in the background: /health answers at once (liveness), /ready only when loaded
        options: dict[str, Any] = {"retrieval": retrieval, "engine": engine, "device": device, "compile": compile}
        loading = asyncio.create_task(_load_in_background(state, model, load, threads, reload_interval, options))
        yield
        await asyncio.wait([loading], timeout=0)
        if state.watcher is not None:
            state.watcher.stop()
        if state.current is not None:  # uvicorn has let in-flight requests finish by now
            state.current.close()

    app = FastAPI(
        title="behaviorlm",
        version=_package_version(),
        summary="Next-action recommendations, propensity and segments from a clickstream transformer.",
        lifespan=lifespan,
        max_body_size=max_body_bytes,  # 413 on larger bodies, streamed (chunked) ones included
    )
    app.state.service = state
    app.add_middleware(ApiKeyGate, key=key)
    app.add_middleware(RequestContext, metrics=state.metrics)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("behaviorlm")
    except PackageNotFoundError:
        return "0"


async def _load_in_background(
    state: ServiceState,
    model: Any,
    load: Callable[..., Serving],
    threads: int,
    reload_interval: float | None,
    options: dict[str, Any],
) -> None:
    try:
        await run_in_threadpool(_first_load, state, model, load, threads, options)
    except Exception as e:  # keep serving /health and say why on /ready
        state.load_error = f"{type(e).__name__}: {e}"
        log.exception("model failed to load")
        return
    if reload_interval and isinstance(model, str) and model.startswith("models:/") and "@" in model:
        assert state.current is not None
        state.watcher = RegistryWatcher(
            model, reload_interval, state.current.provenance, load, state.swap, state.metrics, options
        )
        state.watcher.start()


def _first_load(
    state: ServiceState, model: Any, load: Callable[..., Serving], threads: int, options: dict[str, Any]
) -> None:
    from behaviorlm.inference.batch import set_threads
    from behaviorlm.tracking import load_model_ref

    set_threads(threads)
    t0 = time.perf_counter()
    if isinstance(model, str | Path):
        fitted, provenance = load_model_ref(str(model), **options)
    else:
        fitted, provenance = model, {"model_uri": "in-process", "registry_version": None}
    serving = load(fitted, provenance)
    # Everything loaded so far lives as long as the process: keep it out of the cyclic GC, whose
    # full collections over millions of start-up objects showed up as p99 stalls (RESULTS.md section 8).
    # Before going live, not after: the collection holds the GIL for 0.1-0.3 s, and requests arriving
    # just after /ready turned green waited it out (RESULTS.md section 29).
    gc.collect()
    gc.freeze()
    state.swap(serving)  # being current means ready
    log.info(
        "model %s loaded in %.1fs (%d known users)",
        serving.version,
        time.perf_counter() - t0,
        len(serving.online.rows_),
    )


def _load_serving(
    model: Any,
    provenance: dict[str, Any],
    *,
    segments: str | Path | None,
    max_batch: int,
    metrics: ServiceMetrics,
    rank_cache: int = DEFAULT_ENTRIES,
) -> Serving:
    """Everything one model version needs to answer: built off to the side, then swapped in
    (with it a new, empty rank cache: the new version's histories and weights rank afresh)."""
    seg = SegmentsFolder.load(segments, model.items_) if segments is not None else None
    online = OnlineRecommender.from_model(model, rank_cache)
    batcher = MicroBatcher(
        online.recommend, max_batch=max_batch, name="recommend-batcher", on_batch=metrics.batch_size.observe
    )
    encoder = RequestEncoder(model.engine.tokenizer, model.input_schema_.canonical())
    loaded_at = datetime.now(UTC).isoformat(timespec="seconds")
    return Serving(model, online, batcher, encoder, provenance, seg, loaded_at)


# ---------------------------------------------------------------- middleware, errors, auth
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


class RequestContext:
    """Pure ASGI middleware: a request id (the client's ``X-Request-ID`` if sane, else a new one)
    echoed in the response and written in one log line per request with status and duration.

    Not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware costs a task and a stream
    per request, a measurable share of a 2-core latency budget.
    """

    def __init__(self, app: Any, metrics: ServiceMetrics | None = None):
        self.app, self.metrics = app, metrics
        # process prefix + counter: unique per process, and far cheaper than uuid4 per request
        self._prefix, self._next = secrets.token_hex(4), itertools.count(1)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        rid = given if _REQUEST_ID.fullmatch(given) else f"{self._prefix}-{next(self._next):x}".encode()
        t0, status = time.perf_counter(), 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            log.info("%s %s %s %d %.1fms", rid.decode(), scope["method"], scope["path"], status, seconds * 1000)
            if self.metrics is not None:
                self.metrics.request(scope["path"], status, seconds)


def _add_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = list(dict.fromkeys(_describe(e) for e in exc.errors()))  # one line per field and message
        return JSONResponse({"detail": "; ".join(errors), "errors": errors}, status_code=422)

    @app.exception_handler(BehaviorLMError)
    async def bad_input(request: Request, exc: BehaviorLMError):
        return JSONResponse({"detail": str(exc)}, status_code=422)


_UNION_TAGS = re.compile(r"^(int|float|str|bool|constrained-(int|float|str)|[a-z-]+\[.*\])$")


def _describe(err: dict[str, Any]) -> str:
    """``field 'a.b.0': message``; the union-branch tags pydantic adds to the path are left out."""
    parts = [str(p) for p in err.get("loc", ()) if p != "body" and not _UNION_TAGS.match(str(p))]
    return f"field '{'.'.join(parts) or 'body'}': {err.get('msg', 'invalid')}"


class ApiKeyGate:
    """Pure ASGI middleware: with a key configured, every ``/v1`` request must carry it
    (``X-API-Key`` or ``Authorization: Bearer``). It answers 401 before the body is read, so an
    unauthenticated client learns nothing about what a valid body looks like."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.key or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
        if hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        body = json.dumps({"detail": "missing or wrong API key (header X-API-Key or Authorization: Bearer)"}).encode()
        headers_out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": headers_out})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- routes
def _add_routes(app: FastAPI, state: ServiceState) -> None:

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready():
        serving = state.current
        if serving is None:
            return JSONResponse({"ready": False, "detail": _not_ready(state)}, status_code=503)
        watcher = state.watcher
        return {
            "ready": True,
            "model_version": serving.version,
            "model_uri": public_uri(serving.provenance.get("model_uri")),
            "registry_version": serving.provenance.get("registry_version"),
            "known_users": len(serving.online.rows_),
            "retrieval": serving.online.engine.retrieval_name,
            "segments_date": serving.segments.date if serving.segments else None,
            "loaded_at": serving.loaded_at,
            "reload": watcher.status() if watcher is not None else None,
        }

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/v1/recommend", tags=["v1"], response_model=RecommendResponse)
    async def recommend(req: RecommendRequest, response: Response) -> RecommendResponse:
        with state.hold(response) as serving:
            return await _recommend(state, serving, req)

    @app.post("/v1/next-actions", tags=["v1"], response_model=NextActionsResponse)
    async def next_actions(req: NextActionsRequest, response: Response) -> NextActionsResponse:
        with state.hold(response) as serving:
            return await run_in_threadpool(_next_actions, serving, req)

    @app.post("/v1/propensity", tags=["v1"], response_model=PropensityResponse)
    async def propensity(req: PropensityRequest, response: Response) -> PropensityResponse:
        with state.hold(response) as serving:
            row = await run_in_threadpool(_segment_row, serving, req)
        return PropensityResponse(**{k: row[k] for k in PropensityResponse.model_fields})

    @app.post("/v1/segment", tags=["v1"], response_model=SegmentResponse)
    async def segment(req: PropensityRequest, response: Response) -> SegmentResponse:
        with state.hold(response) as serving:
            row = await run_in_threadpool(_segment_row, serving, req)
        if "tier" not in row:
            folder = serving.segments.folder if serving.segments is not None else "the segments folder"
            raise HTTPException(
                404, f"{folder} has propensity models but no tiers or clusters: run `behaviorlm segment`"
            )
        return SegmentResponse(**row)

    state.metrics.routes = {r.path for r in app.routes if hasattr(r, "path")}


async def _recommend(state: ServiceState, serving: Serving, req: RecommendRequest) -> RecommendResponse:
    if req.adapter is not None and req.explain:
        raise HTTPException(422, "field 'explain': rationales explain the base model; ask without 'adapter'")
    online, batcher = (
        (serving.online, serving.batcher)
        if req.adapter is None
        else await run_in_threadpool(serving.route, req.adapter)
    )
    exclude = serving.model.exclude_seen_ if req.exclude_seen is None else req.exclude_seen
    allowed = online.allowed_index(req.allowed_items) if req.allowed_items is not None else None
    if allowed is not None and len(allowed) == 0:
        raise HTTPException(422, "field 'allowed_items': none of these items is in the model's catalog")
    opts = {"k": req.k, "exclude_seen": exclude, "allowed": allowed}
    events = None
    cacheable = allowed is None and not req.events and not req.explain and online.ranks_.enabled
    if cacheable and online.knows(req.user_id):  # an unknown user is a 404, not a cache miss
        hit = online.cached(req.user_id, req.k, exclude)
        state.metrics.rank_cache.labels("miss" if hit is None else "hit").inc()
        if hit is not None:  # a known user asked again: no model, no batcher hop
            return _recommend_response(serving, req, hit, cold=False)
    if req.events:
        lean = None if req.explain else serving.encoder.encode(req.user_id, _triples(req.events))
        if lean is not None:  # the common case: no DataFrame, no thread hop
            query = online.query_for_request(req.user_id, lean, **opts)
        else:  # what only the full validation can answer (and explanations, which need Events)
            events = await run_in_threadpool(_request_events, serving, req)
            query = await run_in_threadpool(online.query_for_events, req.user_id, events, **opts)
    elif online.knows(req.user_id):
        query = online.query_for_user(req.user_id, **opts)
    else:
        raise _unknown(req.user_id)
    cold = not query.has_known_items()
    if cold:  # nothing in the events is in the catalog: popular items, as BehaviorLM.recommend does
        ranked = online.popular(req.k, allowed)
        ranked.user_id = query.user_id
    else:
        ranked = await asyncio.wrap_future(batcher.submit(query))
    res = _recommend_response(serving, req, ranked, cold)
    if req.explain:
        res.rationales = await run_in_threadpool(_explain, state, serving, req.user_id, ranked, events)
    return res


def _recommend_response(serving: Serving, req: RecommendRequest, ranked: Any, cold: bool) -> RecommendResponse:
    pairs = zip(ranked.item_ids, ranked.scores, strict=True)
    items = [ItemOut(item_id=i, score=s, rank=r) for r, (i, s) in enumerate(pairs, 1)]
    version = serving.version if req.adapter is None else f"{serving.version} + adapter {req.adapter}"
    return RecommendResponse(user_id=req.user_id, model_version=version, cold_start=cold, items=items)


def _triples(events: list[EventIn]) -> list[tuple[Any, str, str | float]]:
    return [(e.item_id, e.event_type, e.timestamp) for e in events]


def public_uri(uri: str | None) -> str | None:
    """What ``/ready`` may show anyone of where the model came from: a registry or run URI as
    it is, a local folder by its name only (its absolute path describes the server's disk)."""
    if uri is None or uri.startswith(("models:/", "runs:/", "in-process")):
        return uri
    return Path(uri).name


def _not_ready(state: ServiceState) -> str:
    if state.load_error:
        return f"model failed to load: {state.load_error}"
    return "model is still loading; retry after GET /ready returns 200"


def _unknown(user_id: Any) -> HTTPException:
    return HTTPException(404, f"unknown user_id {user_id!r}: not in the model's training data; send 'events' instead")


def _request_events(serving: Serving, req: UserInput) -> Events:
    """The request's events as a validated one-user log (see :func:`validate_request_events`)."""
    assert req.events is not None
    uid = "request" if req.user_id is None else str(req.user_id)
    rows = [(e.item_id, e.event_type, e.timestamp) for e in req.events]
    return validate_request_events(serving.model.input_schema_.canonical(), uid, rows)


def validate_request_events(schema: InputSchema, user_id: str, rows: list[tuple[Any, str, Any]]) -> Events:
    """The full path for a request's ``(item_id, event_type, timestamp)`` rows: a one-user log
    validated as files are (errors name the row and column), with action names read through
    the model's own action map and unknown-action policy. The lean path
    (:class:`~behaviorlm.service.request_events.RequestEncoder`) must agree with it."""
    frame = pl.DataFrame(
        {
            "user_id": [user_id] * len(rows),
            "item_id": [None if r[0] is None else str(r[0]) for r in rows],
            "event_type": [r[1] for r in rows],
            "timestamp": request_times([r[2] for r in rows], schema.time_unit, schema.plausible_times),
        }
    )
    return validate_schema(frame, schema, duplicates="keep")


def request_times(values: list[str | float], time_unit: str, plausible_only: bool) -> pl.Series:
    """Request timestamps by the same rules as files: numbers in the detected (or the model's)
    unit, strings as ISO-8601, times before 1990 or after tomorrow refused; every failure is a
    422 naming the field of the first bad event."""
    numbers = [float(v) for v in values if not isinstance(v, str)]
    texts = [v for v in values if isinstance(v, str)]
    try:
        parsed = parse_timestamps(pl.Series("timestamp", numbers, dtype=pl.Float64), time_unit) if numbers else None
        nums = iter(_within_python_range(parsed)) if parsed is not None else None
    except InputDataError as e:
        first = next(i for i, v in enumerate(values) if not isinstance(v, str))
        raise HTTPException(422, f"field 'events.{first}.timestamp': {e.message}") from None
    strs = iter(parse_timestamps(pl.Series("timestamp", texts, dtype=pl.String))) if texts else None
    merged = [next(strs) if isinstance(v, str) else next(nums) for v in values]  # type: ignore[arg-type]
    earliest, latest = plausible_window()
    for i, t in enumerate(merged):
        if t is None and not isinstance(values[i], str):
            raise HTTPException(
                422, f"field 'events.{i}.timestamp': {values[i]!r} is not a time between years 1 and 9999"
            )
        if t is None:
            raise HTTPException(422, f"field 'events.{i}.timestamp': {values[i]!r} is not an ISO-8601 time or a number")
        if plausible_only and not earliest <= t <= latest:
            raise HTTPException(
                422, f"field 'events.{i}.timestamp': {t:%Y-%m-%d %H:%M} is before {earliest:%Y} or after tomorrow"
            )
    return pl.Series("timestamp", merged, dtype=pl.Datetime("us", "UTC"))


def _within_python_range(times: pl.Series) -> pl.Series:
    """Times a Python ``datetime`` can hold (years 1-9999); the others null, so they are refused
    by name instead of overflowing when read out (a number in the wrong unit does that)."""
    micros = times.to_physical()
    return times.set((micros < PY_MIN_MICROS) | (micros > PY_MAX_MICROS), None)


def _explain(
    state: ServiceState, serving: Serving, user_id: Any, ranked: Any, events: Events | None
) -> list[RationaleOut]:
    from behaviorlm.explain import make_explainer
    from behaviorlm.explain.grounded import grounded_contexts
    from behaviorlm.service.online import ranked_frame

    if state.explainer is None:
        state.explainer = make_explainer()
    model = serving.model
    uid = ranked.user_id
    if events is None:
        known = model.history_events()
        events = known.derive(known.df.filter(pl.col("user_id") == uid), "the user's remembered history")
    elif events.df.height:  # the request's own events: explained under the id they were read with
        uid = events.df["user_id"][0]  # ("request" when the body names no user)
    history = events.df
    recs = ranked_frame(ranked, uid).with_columns(pl.col("user_id").cast(history["user_id"].dtype))
    grounded = grounded_contexts(model, recs, events)
    if not grounded.contexts:
        return []
    ctx = grounded.contexts[0]
    return [
        RationaleOut(
            item_id=str(r.item_id),
            rationale=r.rationale,
            evidence=r.evidence,
            source=r.source,
            attributed=_attributed_out(ctx, grounded.attributions, str(r.item_id)),
        )
        for r in state.explainer.explain(ctx)
    ]


def _attributed_out(ctx: Any, attributions: Any, item: str) -> list[AttributedEventOut]:
    """The item's top attributed events, strongest first, as the context numbered them (``E7``)
    and as the attributions hold them (read by event index: one row per event, even when the
    user did the same thing to the same item twice)."""
    rec = next(r for r in ctx.recommendations if r["item_id"] == item)
    if attributions is None:
        return []
    rows = attributions.events.filter(pl.col("item_id").cast(pl.String) == item)
    out = []
    for a in rec.get("attributed", []):
        r = rows.filter(pl.col("event_index") == a["event_index"]).row(0, named=True)
        out.append(
            AttributedEventOut(
                event=a["event"],
                event_index=r["event_index"],
                item_id=str(r["event_item"]),
                action=r["event_action"],
                timestamp=r["event_time"],
                contribution=r["contribution"],
                copy_weight=r["copy_weight"],
            )
        )
    return out


def _next_actions(serving: Serving, req: NextActionsRequest) -> NextActionsResponse:
    model = serving.model
    cfg = req.model_dump(include={"method", "n_steps", "temperature", "top_k", "top_p", "beam_width", "n_samples"})
    cfg["seed"] = req.seed
    if req.events:
        ev = _request_events(serving, req)
        kwargs: dict[str, Any] = {"events": ev}
    elif serving.online.knows(req.user_id):
        kwargs = {"users": [serving.online.query_for_user(req.user_id).user_id]}
    else:
        raise _unknown(req.user_id)
    try:
        paths = model.generate(**kwargs, **cfg)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    probs = model.next_action_proba(**kwargs).drop("user_id", "predicted_action").row(0, named=True)
    steps = [StepOut(**{k: r[k] for k in StepOut.model_fields}) for r in paths.iter_rows(named=True)]
    return NextActionsResponse(
        user_id=req.user_id,
        model_version=serving.version,
        action_probabilities={k.removeprefix("p_"): float(v) for k, v in probs.items()},
        steps=steps,
    )


def _segment_row(serving: Serving, req: UserInput) -> dict[str, Any]:
    """Batch figures for a known user; online scoring of raw events (or of a known user's
    remembered history when the folder holds models but no user table) otherwise."""
    seg = serving.segments
    if seg is None:
        raise HTTPException(
            501, "propensity/segments are off in this service: start it with --segments DIR (a segments folder)"
        )
    base = {"user_id": req.user_id, "horizon": seg.horizon, "segments_date": seg.date, "model_version": serving.version}
    if req.events:
        ev = _request_events(serving, req)
    else:
        row = seg.by_user.get(str(req.user_id))
        if row is not None:
            return base | _batch_figures(row, seg.date)
        if seg.users is not None or not serving.online.knows(req.user_id):
            raise HTTPException(
                404, f"user_id {req.user_id!r} has no batch segment for {seg.date}; send 'events' to score online"
            )
        known = serving.model.history_events()
        uid = serving.online.query_for_user(req.user_id).user_id
        ev = known.derive(known.df.filter(pl.col("user_id") == uid), "the user's remembered history")
    return base | _online_figures(serving, seg, ev)


def _batch_figures(row: dict[str, Any], date: str) -> dict[str, Any]:
    return {
        "propensity": float(row["propensity"]),
        "churn_propensity": _opt_float(row.get("churn_propensity")),
        "as_of": str(row.get("as_of", date)),
        "tier": row["tier"],
        "cluster": int(row["cluster"]),
        "source": "batch",
    }


def _online_figures(serving: Serving, seg: SegmentsFolder, ev: Events) -> dict[str, Any]:
    scores = {c: m.predict(ev, column=c) for c, m in seg.models.items()}
    p = float(scores["propensity"]["propensity"][0])
    churn = scores.get("churn_propensity")
    figures = {
        "propensity": p,
        "churn_propensity": None if churn is None else float(churn["churn_propensity"][0]),
        "as_of": str(scores["propensity"]["as_of"][0]),
        "source": "online",
    }
    if seg.assigner is not None:
        emb = np.stack(serving.model.embed(events=ev)["embedding"].to_numpy())
        figures |= {"tier": seg.assigner.tiers(np.array([p]))[0], "cluster": seg.assigner.clusters(emb)[0]}
    return figures


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
