"""Two-stage retrieval for large catalogs: an ANN index proposes, the exact model disposes.

Scoring every item for every request costs ``items x actions x dim`` multiply-adds plus a
softmax over the catalog: 14M for a 55k-item, 4-action shop, 256M for a 1M-item one -- the
bound on the service's throughput (benchmarks/RESULTS.md section 8). The item head is an inner
product between a per-next-action query ``q_a = h + E_next[a]`` and the tied item embeddings
``E_item`` (:mod:`behaviorlm.nn.model`), so the items with the largest logits under action
``a`` are the maximum-inner-product neighbours of ``q_a`` in ``E_item``. Here:

1. an HNSW index over the item embeddings (inner product) returns, for each next-action
   query, its nearest items;
2. the union of those candidates is re-scored exactly by the model's own head;
3. each action's softmax normaliser ``Z_a`` is the exact sum over the candidates plus an
   unbiased estimate of the rest from a fixed uniform sample of the catalog (``tail_sample``
   items, drawn once when the index is built), so scores are probabilities on the exact scale
   up to that estimate and the marginal over actions weighs the actions correctly;
4. allow-lists are scored exactly (they are at most 10,000 items: cheaper than a search), and
   a row whose seen items leave fewer than ``k`` candidates is searched again, deeper.

How deep to search depends on the model, so a new index calibrates itself: the shallowest
rung of :data:`DEPTHS` whose top-10 agrees with exact ranking on 99.5% of a sample of the
model's own users (no labels involved) is stored with it. The approximation is measured, not
assumed: recall@10 against exact full-catalog top-10 and the NDCG@10 change on leave-one-out are
in ``benchmarks/retrieval.py`` (RESULTS.md section 16).

Whether the index is worth it depends on the path, not only on the catalog: exact ranking is a
matrix product whose cost per user falls as more users share it, the index's cost per user does
not. So the service's micro-batches on one thread and batch scoring's large batches on every
core can want different answers for the same model (a 23.7k-item model ranked 6,333 users/s
exact and 3,350 with the index in batch). A new index times both ways for each path of
:data:`PATHS` on the same sample and stores the cheaper one (:meth:`ItemIndex.measure_routes`);
``retrieval="auto"`` follows that record, ``"ann"`` uses the index everywhere.

The index lives in the model directory's ``retrieval/`` folder (this module owns it):
``index.bin`` and ``index.json``, whose fingerprint (model version, catalog size, dimension,
backend, parameters) must match the model it is loaded for, and which records the digest of
``index.bin`` and ``tail.npy``: a file that does not verify never reaches the backend's loader
(a flipped byte in a graph can load and answer wrongly). A mismatch or a damaged file is
refused with a one-line message and the index rebuilt, never used.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from behaviorlm.data.io import atomic_dir, file_digest
from behaviorlm.errors import ConfigurationError, ModelFormatError
from behaviorlm.extras import missing_extra
from behaviorlm.nn.copy_head import gate_logps, mix
from behaviorlm.sequence.tokenizer import N_SPECIAL

log = logging.getLogger(__name__)

BACKENDS = ("hnswlib", "faiss", "usearch")
RETRIEVAL_MODES = ("auto", "exact", "ann")
FOLDER = "retrieval"
#: Below this many items ``auto`` does not build an index at all (section 16: at 3.7k items a
#: full-catalog pass is 5.7x cheaper than the index path on every path); from here up it builds
#: one and lets the measured cost of each path decide (:meth:`ItemIndex.measure_routes`).
ANN_MIN_ITEMS = 10_000
#: How each path asks for top-k lists: (rows per call, torch threads; None = the process's). The
#: service ranks micro-batches of a few requests on one thread (``serve --threads 1``); batch
#: scoring ranks ``ScoringOptions.batch_size`` rows on every core.
PATHS: dict[str, tuple[int, int | None]] = {"online": (8, 1), "batch": (128, None)}
FORMAT_VERSION = 2  # 2: index.json records the digests of the files it describes
#: (ef_search, candidates per next-action query) tried by :meth:`ItemIndex.tune`, shallow first
DEPTHS = ((24, 16), (32, 20), (48, 30), (64, 50), (100, 100), (200, 200), (400, 400))
TARGET_RECALL = 0.995  # on training histories; Taobao's test inputs ran ~0.02 lower (RESULTS.md section 16)
#: P(next action) thresholds below which :meth:`ItemIndex.tune` tries not searching an action's query, largest first
SKIP_BELOW = (0.1, 0.05, 0.02, 0.01)
#: what the stored graph depends on (the rest -- search depth -- is chosen at query time)
GRAPH_PARAMS = ("backend", "m", "ef_construction", "tail_sample", "seed")


@dataclass(frozen=True)
class IndexParams:
    """HNSW settings. ``m`` links per node and ``ef_construction`` fix the graph; ``ef_search``
    (the search beam) and ``min_fetch`` (candidates per next-action query, at least ``k``) are
    the query-time depth: the shallowest one tried by :meth:`ItemIndex.tune`, which a new index
    deepens until it agrees with exact ranking (M=32 / efConstruction=200: section 16's choice)."""

    backend: str = "hnswlib"
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 24
    min_fetch: int = 16
    tail_sample: int = 2048
    seed: int = 0
    #: a row's next-action queries whose P(action) is below this are not searched (its likeliest
    #: action always is; items of a skipped query still compete when another query or the
    #: context proposes them). 0: search every action; None: as :meth:`ItemIndex.tune` chooses
    #: (0 until it has).
    skip_below: float | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigurationError(
                f"ANN backend must be one of {list(BACKENDS)}, got {self.backend!r}",
                cli_hint=f"--ann-backend must be one of {list(BACKENDS)}",
            )
        for name in ("m", "ef_construction", "ef_search", "min_fetch", "tail_sample"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.skip_below is not None and not 0 <= self.skip_below < 1:
            raise ConfigurationError(f"skip_below must be in [0, 1), got {self.skip_below}")


class _Backend(Protocol):
    def add(self, vectors: np.ndarray) -> None: ...
    def search(self, queries: np.ndarray, k: int, ef: int) -> np.ndarray: ...
    def save(self, path: Path) -> None: ...
    def memory_bytes(self) -> int: ...


class _Hnswlib:
    def __init__(self, dim: int, n: int, p: IndexParams, path: Path | None = None):
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=dim)
        if path is not None:
            self.index.load_index(str(path), max_elements=n)
        else:
            self.index.init_index(max_elements=n, ef_construction=p.ef_construction, M=p.m, random_seed=p.seed)
        self.index.set_ef(p.ef_search)
        self.p = p

    def add(self, vectors: np.ndarray) -> None:
        self.index.add_items(vectors, np.arange(len(vectors)), num_threads=-1)

    def search(self, queries: np.ndarray, k: int, ef: int) -> np.ndarray:
        self.index.set_ef(max(ef, k))
        labels, _ = self.index.knn_query(queries, k=k, num_threads=_threads(len(queries)))
        return labels.astype(np.int64)

    def save(self, path: Path) -> None:
        self.index.save_index(str(path))

    def memory_bytes(self) -> int:
        n, dim = self.index.get_current_count(), self.index.dim
        return n * (dim * 4 + self.p.m * 2 * 4 + 16)  # vectors + level-0 links (hnswlib's layout)


class _Faiss:
    def __init__(self, dim: int, n: int, p: IndexParams, path: Path | None = None):
        import faiss

        self.faiss = faiss
        if path is not None:
            self.index = faiss.read_index(str(path))
        else:
            self.index = faiss.IndexHNSWFlat(dim, p.m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = p.ef_construction
        self.p = p

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors, np.float32))

    def search(self, queries: np.ndarray, k: int, ef: int) -> np.ndarray:
        self.index.hnsw.efSearch = max(ef, k)  # type: ignore[attr-defined]
        _, labels = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        return labels.astype(np.int64)

    def save(self, path: Path) -> None:
        self.faiss.write_index(self.index, str(path))

    def memory_bytes(self) -> int:
        return int(self.index.ntotal * (self.index.d * 4 + self.p.m * 2 * 8))


class _Usearch:
    def __init__(self, dim: int, n: int, p: IndexParams, path: Path | None = None):
        from usearch.index import Index

        self.index = Index(
            ndim=dim,
            metric="ip",
            dtype="f32",
            connectivity=p.m,
            expansion_add=p.ef_construction,
            expansion_search=p.ef_search,
        )
        if path is not None:
            self.index.load(str(path))
        self.p = p

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.arange(len(vectors)), np.ascontiguousarray(vectors, np.float32))

    def search(self, queries: np.ndarray, k: int, ef: int) -> np.ndarray:
        self.index.expansion_search = max(ef, k)  # type: ignore[misc]  # settable at run time
        found = self.index.search(np.ascontiguousarray(queries, np.float32), k, threads=_threads(len(queries)))
        keys = np.asarray(found.keys, np.int64).reshape(len(queries), k)
        counts = np.asarray(found.counts).reshape(-1, 1)  # type: ignore[union-attr]  # batch queries: BatchMatches
        return np.where(np.arange(k)[None, :] < counts, keys, -1)  # short results pad with key 0: mask them

    def save(self, path: Path) -> None:
        self.index.save(str(path))

    def memory_bytes(self) -> int:
        return int(self.index.memory_usage)


def _threads(n_queries: int) -> int:
    """Search threads: torch's budget (one in the service, every core in batch scoring), never
    more than a thread per 16 queries (a thread pool costs more than a few searches)."""
    return max(1, min(torch.get_num_threads(), n_queries // 16))


_ADAPTERS: dict[str, type] = {"hnswlib": _Hnswlib, "faiss": _Faiss, "usearch": _Usearch}


class ItemIndex:
    """An ANN index over a model's real items (vocabulary index ``N_SPECIAL + row``).

    ``routing`` off (``retrieval="ann"``): every path ranks through it; on (``"auto"``): each path
    of :data:`PATHS` as its measured cost chose (:meth:`serves`)."""

    def __init__(self, backend: _Backend, fingerprint: dict[str, Any], tail: np.ndarray, params: IndexParams):
        self.backend, self.fingerprint, self.tail_, self.params = backend, fingerprint, tail, params
        self.routing = False

    def routed(self, on: bool) -> ItemIndex:
        """This index (the same graph) with :attr:`routing` set."""
        other = copy.copy(self)
        other.routing = on
        return other

    def serves(self, path: str) -> bool:
        """Whether ``path`` (a key of :data:`PATHS`) ranks through this index: always without
        routing; with it, as :meth:`measure_routes` chose (an index never measured: yes)."""
        route = self.fingerprint.get("routes", {}).get(path)
        return not self.routing or route is None or bool(route["ann"])

    def route_name(self, path: str) -> str:
        """How ``path`` ranks: the index's name or ``exact``, and why when the cost chose."""
        if not self.routing or "routes" not in self.fingerprint:
            return self.name
        return f"{self.name if self.serves(path) else 'exact'} (measured cheaper for {path})"

    @property
    def name(self) -> str:
        return f"ann:{self.params.backend}"

    @staticmethod
    def fingerprint_of(network: Any, model_version: str, params: IndexParams) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_version": model_version,
            "n_items": int(network.config.n_items),
            "dim": int(network.config.dim),
            "params": {k: v for k, v in asdict(params).items() if k in GRAPH_PARAMS},
        }

    @classmethod
    def build(cls, network: Any, model_version: str, params: IndexParams | None = None) -> ItemIndex:
        """Index the item embeddings of ``network`` (seconds to minutes: 1M items ~10 min on 2 cores)."""
        params = params or IndexParams()
        emb = network.item_matrix().detach()[N_SPECIAL:].numpy().astype(np.float32)
        t0 = time.perf_counter()
        backend = _ADAPTERS[params.backend](emb.shape[1], len(emb), params)
        backend.add(emb)
        log.info("built %s index over %d items in %.1fs", params.backend, len(emb), time.perf_counter() - t0)
        rng = np.random.default_rng(params.seed)
        tail = np.sort(rng.choice(len(emb), size=min(params.tail_sample, len(emb)), replace=False)) + N_SPECIAL
        return cls(backend, cls.fingerprint_of(network, model_version, params), tail, params)

    def save(self, model_dir: str | Path) -> Path:
        """Write ``model_dir/retrieval`` atomically."""
        target = Path(model_dir) / FOLDER
        with atomic_dir(target, "index.json", "ANN index") as tmp:
            self.backend.save(tmp / "index.bin")
            np.save(tmp / "tail.npy", self.tail_)
            files = {name: file_digest(tmp / name) for name in _FILES}
            (tmp / "index.json").write_text(json.dumps({**self.fingerprint, "files": files}, indent=2))
        return target

    @classmethod
    def load(cls, model_dir: str | Path, network: Any, model_version: str, params: IndexParams) -> ItemIndex:
        """The stored index; :class:`ModelFormatError` naming the difference if it was built for
        another model, vocabulary or settings."""
        folder = Path(model_dir) / FOLDER
        meta_path = folder / "index.json"
        if not meta_path.is_file():
            raise ModelFormatError(f"{folder}: no ANN index stored")
        try:
            return cls._load(folder, network, model_version, params)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
            why = " ".join(str(e).split())[:200]
            raise ModelFormatError(f"{folder}: the ANN index is damaged ({type(e).__name__}: {why})") from e

    @classmethod
    def _load(cls, folder: Path, network: Any, model_version: str, params: IndexParams) -> ItemIndex:
        stored = json.loads((folder / "index.json").read_text())
        stored["params"] = {k: v for k, v in stored.get("params", {}).items() if k in GRAPH_PARAMS}
        expected = cls.fingerprint_of(network, model_version, params)
        diff = [k for k in expected if stored.get(k) != expected[k]]
        if diff:
            got = {k: stored.get(k) for k in diff}
            want = {k: expected[k] for k in diff}
            raise ModelFormatError(f"{folder}: the ANN index does not match this model: stored {got}, model {want}")
        for name in _FILES:
            if file_digest(folder / name) != stored["files"][name]:
                raise ModelFormatError(f"{folder}: the ANN index's {name} is not the file it was saved with")
        stored.pop("files")
        n_real = int(network.config.n_items) - N_SPECIAL
        backend = _ADAPTERS[params.backend](int(network.config.dim), n_real, params, folder / "index.bin")
        index = cls(backend, stored, np.load(folder / "tail.npy"), params)
        if "tuned" in stored:  # the search depth calibrated for this model when the index was made
            tuned = stored["tuned"]
            skip = params.skip_below if params.skip_below is not None else tuned.get("skip_below", 0.0)
            index.params = replace(params, **tuned["params"], skip_below=skip)
        return index

    def memory_bytes(self) -> int:
        return self.backend.memory_bytes()

    def tune(self, engine: Any, enc: Any, target: float = TARGET_RECALL, n_users: int = 256) -> dict[str, Any]:
        """Calibrate the search depth to this model: the shallowest (ef, candidates) rung of
        :data:`DEPTHS` at or above the configured one whose top-10 recall against exact ranking,
        over a fixed sample of the model's own users, reaches ``target``; the deepest otherwise.

        Models differ: an under-trained catalog of popular items is easy at ef 64, a trained
        four-action marginal needs 200 (benchmarks/RESULTS.md section 16). No labels are used --
        only agreement with the exact ranking -- so tuning on the model's users leaks nothing.
        """
        rows = np.sort(np.random.default_rng(self.params.seed).permutation(len(enc))[:n_users])
        sub = enc.subset(rows)
        h, a_logp = engine.heads(sub, slice(0, len(sub)))
        exact = np.concatenate(  # in batches: (256 x 1M items) log-probs per next action would not fit
            [
                engine.with_index(None).rank(h[i : i + 64], a_logp[i : i + 64], slice(0, 1), 10)[1].numpy()
                for i in range(0, len(sub), 64)
            ]
        )
        ann = engine.with_index(self)  # the depth changes below on this very object
        start = self.params
        recall = 0.0
        for ef, fetch in [d for d in DEPTHS if d[0] >= min(start.ef_search, DEPTHS[-1][0])] or DEPTHS[-1:]:
            self.params = replace(start, ef_search=ef, min_fetch=max(fetch, start.min_fetch))  # the caller's floor
            recall = _recall_against(exact, ann, h, a_logp)
            if recall >= target:
                break
        recall = self._tune_skip(ann, h, a_logp, exact, target, recall)
        tuned = {
            "params": {"ef_search": self.params.ef_search, "min_fetch": self.params.min_fetch},
            "skip_below": self.params.skip_below or 0.0,  # apart from params: older readers replace() with those
            "recall_at_10": recall,
            "users": len(sub),
            "target": target,
        }
        self.fingerprint = {**self.fingerprint, "tuned": tuned}
        log.info(
            "ANN search depth for this model: ef=%d, %d candidates (recall@10 %.4f vs exact over %d users)",
            self.params.ef_search,
            self.params.min_fetch,
            recall,
            len(sub),
        )
        return tuned

    def _tune_skip(
        self, ann: Any, h: torch.Tensor, a_logp: torch.Tensor, exact: np.ndarray, target: float, recall: float
    ) -> float:
        """At the chosen depth, the largest :data:`SKIP_BELOW` threshold whose recall against
        ``exact`` still reaches ``target`` (most rows put most of their mass on one or two next
        actions: the other queries cost a search each and rarely add a top-10 item); 0 when none
        does. Returns the recall at the chosen setting."""
        if recall < target or self.params.skip_below is not None:  # below target, or set by the caller
            return recall
        start = self.params
        for below in SKIP_BELOW:
            self.params = replace(start, skip_below=below)
            got = _recall_against(exact, ann, h, a_logp)
            if got >= target:
                return got
        self.params = start
        return recall

    def measure_routes(self, engine: Any, enc: Any, n_users: int = 256, k: int = 10) -> dict[str, Any]:
        """Time exact and two-stage top-``k`` for each path of :data:`PATHS` -- its rows per call
        and threads -- on a fixed sample of the model's users (their own items excluded, as batch
        scoring does by default), and record which is cheaper; :meth:`serves` reads it. Best of
        two rounds each, so one stall does not decide."""
        rows = np.sort(np.random.default_rng(self.params.seed + 1).permutation(len(enc))[:n_users])
        sub = enc.subset(rows)
        h, a_logp = engine.heads(sub, slice(0, len(sub)))
        seen = _own_items(sub)
        engines = {"exact": engine.with_index(None), "ann": engine.with_index(self.routed(False))}
        routes = {}
        for path, (per_call, threads) in PATHS.items():
            n = min(len(sub), 8 * per_call)  # eight calls of the path's size at most
            with _torch_threads(threads):
                costs = {
                    name: _ms_per_user(partial(_rank_rows, e, h, a_logp, k, seen, path), n, per_call)
                    for name, e in engines.items()
                }
            routes[path] = {
                "ann": costs["ann"] < costs["exact"],
                "exact_ms_per_user": round(costs["exact"], 4),
                "ann_ms_per_user": round(costs["ann"], 4),
                "rows_per_call": per_call,
                "threads": threads or torch.get_num_threads(),
                "users": n,
            }
            log.info(
                "%s path: exact %.3f ms/user, two-stage %.3f ms/user -> %s",
                path,
                costs["exact"],
                costs["ann"],
                "the index" if routes[path]["ann"] else "exact",
            )
        self.fingerprint = {**self.fingerprint, "routes": routes}
        return routes

    # ------------------------------------------------------------------ search and re-score
    def candidates(self, queries: np.ndarray, fetch: int) -> np.ndarray:
        """Vocabulary indices of the ``fetch`` nearest items of each query, (Q, fetch); a slot
        the search could not fill is below ``N_SPECIAL`` (treated as no candidate). The search
        depth is ``params.ef_search`` as it is now -- the tuned one, once :meth:`tune` ran --,
        never the depth the backend was built with."""
        n_real = self.fingerprint["n_items"] - N_SPECIAL
        return self.backend.search(queries, min(fetch, n_real), self.params.ef_search) + N_SPECIAL


_FILES = ("index.bin", "tail.npy")
_NONE = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # no seen pairs


def _own_items(enc: Any) -> tuple[np.ndarray, np.ndarray]:
    """(row, vocabulary index) of every item token of each row of ``enc``: the seen pairs that
    batch scoring masks by default."""
    rows = np.repeat(np.arange(len(enc)), np.diff(enc.offsets))
    cols = np.asarray(enc.items, np.int64)
    keep = cols >= N_SPECIAL
    return rows[keep], cols[keep]


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` for a block (``None``: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _recall_against(exact: np.ndarray, engine: Any, h: torch.Tensor, a_logp: torch.Tensor) -> float:
    """Mean recall@10 of the two-stage top-10 of precomputed heads (nothing masked, 8 rows a
    call, at the index's depth as it is now) against ``exact``: what tuning compares."""
    found = [
        two_stage_top_k(engine, h[i : i + 8], a_logp[i : i + 8], slice(i, i + 8), 10, _NONE, None, None)[1].numpy()
        for i in range(0, len(h), 8)
    ]
    return float(top_k_recall(exact, np.concatenate(found)).mean())


def _rank_rows(engine: Any, h: torch.Tensor, a_logp: torch.Tensor, k: int, seen: Any, path: str, rows: slice) -> Any:
    """``engine.rank`` of some rows of precomputed heads (what :meth:`ItemIndex.measure_routes` times)."""
    return engine.rank(h[rows], a_logp[rows], rows, k, seen, path=path)


def _ms_per_user(rank: Callable[[slice], Any], n: int, per_call: int, rounds: int = 2) -> float:
    """Milliseconds per user of ``rank(rows)`` over ``n`` users, ``per_call`` rows a call; best of ``rounds``."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(0, n, per_call):
            rank(slice(i, min(i + per_call, n)))
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / max(n, 1)


def open_index(
    model_dir: str | Path | None,
    engine: Any,
    params: IndexParams | None = None,
    users: Any = None,
) -> ItemIndex:
    """The model's stored index if it matches, else a new one, its search depth tuned on
    ``users`` (the model's encoded histories) when given, stored beside the model when the
    directory is writable. Never an index of another model: a mismatch or a damaged index is
    one warning line and a rebuild (none stored yet is not worth a warning)."""
    params = params or IndexParams()
    network, model_version = engine.network, engine.version
    if model_dir is not None and (Path(model_dir) / FOLDER / "index.json").is_file():
        try:
            index = ItemIndex.load(model_dir, network, model_version, params)
        except ModelFormatError as e:
            log.warning("%s; building a new one", e)
        else:
            if _calibrate(index, engine, users):  # stored before depth tuning or cost routes: once
                _store(index, model_dir)
            return index
    index = ItemIndex.build(network, model_version, params)
    _calibrate(index, engine, users)
    if model_dir is not None:
        _store(index, model_dir)
    return index


def _calibrate(index: ItemIndex, engine: Any, users: Any) -> bool:
    """Tune the search depth and measure each path's cost on ``users`` where not done yet;
    whether anything was (so the caller stores it)."""
    if users is None or not len(users):
        return False
    todo = [s for s in ("tuned", "routes") if s not in index.fingerprint]
    if "tuned" in todo:
        index.tune(engine, users)
    if todo:
        index.measure_routes(engine, users)
    return bool(todo)


def _store(index: ItemIndex, model_dir: str | Path) -> None:
    try:
        index.save(model_dir)
    except OSError as e:  # a read-only model folder still serves, from the in-memory index
        log.warning("could not store the ANN index beside the model (%s); it lives in memory only", e)


def wants_ann(mode: str, n_items: int, backend: str = "hnswlib") -> bool:
    """Whether ``mode`` (auto | exact | ann) means an index for a catalog of ``n_items``.

    ``auto`` without the ANN library installed stays exact (and says so once); ``ann`` without
    it is an error naming the extra to install."""
    if mode not in RETRIEVAL_MODES:
        raise ConfigurationError(
            f"retrieval must be one of {list(RETRIEVAL_MODES)}, got {mode!r}",
            cli_hint=f"--retrieval must be one of {list(RETRIEVAL_MODES)}",
        )
    wanted = mode == "ann" or (mode == "auto" and n_items - N_SPECIAL >= ANN_MIN_ITEMS)
    if wanted and importlib.util.find_spec(backend) is None:
        if mode == "ann":
            raise missing_extra("ann", f"two-stage retrieval ({backend})", ImportError(backend))
        if backend not in _WARNED:
            _WARNED.add(backend)
            log.warning(
                "%d items: exact ranking, because %s is not installed (pip install 'behaviorlm[ann]')",
                n_items - N_SPECIAL,
                backend,
            )
        return False
    return wanted


_WARNED: set[str] = set()


def top_k_recall(reference: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Per row, the share of ``reference``'s top-k ids that ``found`` also holds (recall@k of an
    approximate top-k against the exact one; both (rows, k))."""
    k = reference.shape[1]
    return np.array([len(set(a) & set(b)) / k for a, b in zip(reference, found, strict=True)])


# ---------------------------------------------------------------------- two-stage top-k
NEG_INF = float("-inf")


@torch.inference_mode()
def two_stage_top_k(
    engine: Any,
    h: torch.Tensor,
    a_logp: torch.Tensor,
    rows: slice,
    k: int,
    seen: tuple[np.ndarray, np.ndarray],
    allowed: torch.Tensor | None,
    action_id: int | None,
    new_items: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`InferenceEngine.rank` through ``engine.index``: candidates, exact re-score, top-k.

    The first search fetches ``min_fetch`` items per next-action query. Rows whose seen items
    then leave fewer than ``k`` are searched again, four times deeper each round, until the
    fetch exceeds ``k`` plus their seen count; a row still short is ranked exactly over the
    full catalog. So a filter never shortens a list the exact path would have filled.
    """
    index: ItemIndex = engine.index
    k = min(k, engine.n_items - N_SPECIAL)  # what the exact path returns at most
    acts = engine.real_actions if action_id is None else torch.tensor([action_id])
    q = engine.network.hidden(h)[:, None, :] + engine.network.next_action_emb.weight[acts][None]  # (B, A, d)
    if allowed is not None:  # allow-lists are scored exactly: cheaper than a search
        return _score_candidates(engine, h, q, a_logp, acts, _allowed_candidates(allowed, len(h)), rows, k, seen)
    fetch = max(index.params.min_fetch, k)
    wanted = _wanted_queries(a_logp[:, acts], index.params.skip_below or 0.0)
    val, idx = _score_candidates(
        engine, h, q, a_logp, acts, _search(index, q, fetch, h, engine, new_items, wanted), rows, k, seen
    )
    n_seen = np.bincount(_seen_rows(seen, rows), minlength=len(h))
    short = (torch.isfinite(val).sum(1) < k).nonzero().flatten()
    while len(short) and fetch < k + n_seen[short.numpy()].max():  # filters removed too many: search deeper
        fetch *= 4
        sub_seen = _rows_of(seen, rows, short.numpy())
        found = _search(index, q[short], fetch, h[short], engine, new_items)
        val[short], idx[short] = _score_candidates(
            engine, h[short], q[short], a_logp[short], acts, found, slice(0, len(short)), k, sub_seen
        )
        short = short[torch.isfinite(val[short]).sum(1) < k]
    if len(short):  # still short with every seen item fetched past: the exact path
        exact = engine.item_logp(h[short], a_logp[short], action_id, new_items)
        val[short], idx[short] = engine.top_k(exact, slice(0, len(short)), k, _rows_of(seen, rows, short.numpy()))
    return val, idx


def _wanted_queries(a_logp: torch.Tensor, skip_below: float) -> torch.Tensor | None:
    """(B, A): which next-action queries to search -- each row's actions at or above
    ``skip_below`` in probability, and its likeliest always; ``None``: all of them."""
    if skip_below <= 0 or a_logp.shape[1] == 1:
        return None
    wanted = a_logp.exp() >= skip_below
    wanted[torch.arange(len(a_logp)), a_logp.argmax(1)] = True
    return wanted


def _search(
    index: ItemIndex,
    q: torch.Tensor,
    fetch: int,
    state: torch.Tensor,
    engine: Any,
    new_items: bool = False,
    wanted: torch.Tensor | None = None,
) -> torch.Tensor:
    """The union of each row's candidates over its next-action queries (the ``wanted`` ones;
    all by default), (B, <= A * fetch), plus -- for a repeat-aware model -- every item of the
    row's context, which the copy part can rank high whatever its embedding: at most
    ``max_len`` more, scored exactly like the rest (its new items, ``n_items + position``, only
    with ``new_items``)."""
    flat = q.reshape(-1, q.shape[-1])
    if wanted is None:
        found = torch.from_numpy(index.candidates(flat.numpy(), fetch))
    else:  # skipped queries propose nothing (PAD, never a candidate)
        keep = wanted.reshape(-1)
        some = torch.from_numpy(index.candidates(flat[keep].numpy(), fetch))
        found = torch.zeros(len(flat), some.shape[1], dtype=some.dtype)
        found[keep] = some
    found = found.reshape(len(q), -1)
    layout = engine.network.state_layout
    if layout is not None:
        context = layout.context_items(state)
        found = torch.cat([found, context if new_items else context.masked_fill(context >= engine.n_items, 0)], 1)
    return _unique_rows(found)


def _score_candidates(
    engine: Any,
    state: torch.Tensor,
    q: torch.Tensor,
    a_logp: torch.Tensor,
    acts: torch.Tensor,
    cand: torch.Tensor,
    rows: slice,
    k: int,
    seen: tuple[np.ndarray, np.ndarray],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-probs of the candidates (PAD entries invalid), seen items masked, top-``k``.
    New context items (``>= n_items``) have no embedding: only the copy part scores them."""
    valid = (cand >= N_SPECIAL) & (cand < engine.n_items)
    emb = engine.network.item_matrix()
    scores = torch.einsum("bad,bcd->bac", q, emb[cand.masked_fill(~valid, 0)])  # the model's own logits
    scores.masked_fill_(~valid[:, None, :], NEG_INF)
    logp = scores - _log_normaliser(q, scores, cand, valid, engine.index.tail_, emb, engine.n_items)[..., None]
    logp = _with_copy(engine.network, state, q, logp, cand)
    logp = torch.logsumexp(a_logp[:, acts][..., None] + logp, dim=1) if len(acts) > 1 else logp[:, 0]
    stride = engine.network.extended_width  # new items (>= n_items) must not alias the next row's
    keys = _seen_keys(seen, rows, stride)
    if len(keys):
        row_of = torch.arange(len(q))[:, None] + rows.start
        logp.masked_fill_(torch.isin(row_of * stride + cand, keys), NEG_INF)
    val, pos = torch.topk(logp, min(k, logp.shape[1]), dim=1)
    return _pad(val, cand.gather(1, pos), k)


def _with_copy(
    network: Any, state: torch.Tensor, q: torch.Tensor, gen: torch.Tensor, cand: torch.Tensor
) -> torch.Tensor:
    """The candidates' catalog log-probs (B, A, C) mixed with their exact copy log-probs, for a
    repeat-aware model (:mod:`behaviorlm.nn.copy_head`); unchanged otherwise."""
    layout = network.state_layout
    if layout is None:
        return gen
    log_g, log_1mg = gate_logps(network.copy_head.gate_logits(q), layout.has_copy(state)[:, None])
    return mix(gen, layout.copy_logp_columns(state, cand)[:, None, :], log_g, log_1mg)


def _seen_in(seen: tuple[np.ndarray, np.ndarray], rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """The seen pairs of the batch covering ``rows``: (row within the batch, vocabulary index)."""
    a, b = np.searchsorted(seen[0], [rows.start, rows.stop])
    return seen[0][a:b] - rows.start, seen[1][a:b]


def _seen_rows(seen: tuple[np.ndarray, np.ndarray], rows: slice) -> np.ndarray:
    return _seen_in(seen, rows)[0]


def _seen_keys(seen: tuple[np.ndarray, np.ndarray], rows: slice, stride: int) -> torch.Tensor:
    """``row * stride + item`` of the seen pairs within ``rows`` (global row numbers)."""
    local, cols = _seen_in(seen, rows)
    return torch.from_numpy((local + rows.start) * stride + cols)


def _rows_of(seen: tuple[np.ndarray, np.ndarray], rows: slice, picked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The seen pairs of some rows of the batch, renumbered 0.. in ``picked`` order."""
    local, cols = _seen_in(seen, rows)
    new_row = np.full(rows.stop - rows.start, -1)
    new_row[picked] = np.arange(len(picked))
    keep = new_row[local] >= 0
    r, c = new_row[local][keep], cols[keep]
    order = np.argsort(r, kind="stable")
    return r[order].astype(np.int64), c[order].astype(np.int64)


def _allowed_candidates(allowed: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Allow-lists as candidate rows, padded with PAD (0, masked as invalid)."""
    if allowed.dim() == 1:
        return allowed.nonzero().flatten()[None, :].expand(n_rows, -1).clone()
    per_row = [m.nonzero().flatten() for m in allowed]
    return torch.nn.utils.rnn.pad_sequence(per_row, batch_first=True, padding_value=0)


def _unique_rows(cand: torch.Tensor) -> torch.Tensor:
    """Each row's candidates with duplicates (the same item proposed under two actions) set to PAD."""
    srt, _ = torch.sort(cand, dim=1)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    return srt.masked_fill(dup | (srt < N_SPECIAL), 0)


def _log_normaliser(
    q: torch.Tensor,
    scores: torch.Tensor,
    cand: torch.Tensor,
    valid: torch.Tensor,
    tail: np.ndarray,
    emb: torch.Tensor,
    n_items: int,
) -> torch.Tensor:
    """``log Z_a`` per (row, action): the candidates' exact sum plus the rest of the catalog
    estimated from the uniform ``tail`` sample (its members outside the candidates, scaled)."""
    in_cand = torch.logsumexp(scores, dim=2)  # (B, A)
    n_real = n_items - N_SPECIAL
    n_rest = n_real - valid.sum(1)  # (B,)
    if n_rest.max() <= 0:
        return in_cand
    t = torch.from_numpy(tail)
    t_scores = torch.einsum("bad,td->bat", q, emb[t])  # (B, A, S)
    srt = torch.sort(cand, dim=1).values
    pos = torch.searchsorted(srt, t.expand(len(cand), -1).contiguous()).clamp(max=srt.shape[1] - 1)
    member = srt.gather(1, pos) == t[None, :]  # (B, S): sampled item is a candidate
    t_scores.masked_fill_(member[:, None, :], NEG_INF)
    n_out = (~member).sum(1).clamp(min=1)
    rest = torch.logsumexp(t_scores, dim=2) + (n_rest.float() / n_out.float()).log()[:, None]
    rest = torch.where((n_rest > 0)[:, None], rest, torch.full_like(rest, NEG_INF))
    return torch.logaddexp(in_cand, rest)


def _pad(val: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if val.shape[1] >= k:
        return val, idx
    extra = k - val.shape[1]
    return (
        torch.cat([val, torch.full((len(val), extra), NEG_INF)], 1),
        torch.cat([idx, torch.zeros((len(idx), extra), dtype=idx.dtype)], 1),
    )
