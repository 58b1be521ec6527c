"""``BehaviorLM``: the estimator users touch -- fit on events, recommend with original ids.

Shaped after RecTools and scikit-learn: hyper-parameters in ``__init__`` (a named recipe plus
explicit overrides, :mod:`behaviorlm.recipes`), learned state in attributes with a trailing
underscore (``tokenizer_``, ``model_``, ``engine_``, ``history_``, ``input_schema_``), and
``recommend`` returning a DataFrame ``user_id, item_id, score, rank`` in the caller's ids.
Every scoring method is a thin call into the one :class:`~behaviorlm.inference.engine.InferenceEngine`.

A fitted model keeps each training user's most recent ``max_len`` events and the set of items
they touched, so ``recommend(users=[...])`` needs no event data; ``recommend(events=...)`` scores
anyone -- including users never seen in training -- straight from raw events, read with the
input schema the model was trained with. Users with no events at all get the documented
cold-start answer: the most popular training items.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch

from behaviorlm.data.events import Events, as_events, validate_items
from behaviorlm.data.ids import cast_ids
from behaviorlm.data.schema import InputSchema
from behaviorlm.data.timestamps import to_utc, unix_micros
from behaviorlm.errors import ConfigurationError, InputDataError, NotFittedError
from behaviorlm.evaluation.baselines import RepeatBaseline, catalog_index
from behaviorlm.evaluation.leakage import stage_record, with_increment
from behaviorlm.evaluation.metrics import mean_ndcg, seen_lists
from behaviorlm.evaluation.splits import Holdout
from behaviorlm.inference.engine import FRAME_SCHEMA, NO_SEEN, InferenceEngine, first_positions
from behaviorlm.inference.retrieval import IndexParams, open_index, wants_ann
from behaviorlm.model_dir import Adapter, ModelFiles, model_version, read_model_dir, write_model_dir
from behaviorlm.nn import distributed
from behaviorlm.nn.checkpoint import Checkpointing
from behaviorlm.nn.copy_head import GATE_SHIFTS_COARSE, calibrate_gate
from behaviorlm.nn.device import resolve as resolve_device
from behaviorlm.nn.gap_head import censor_positions
from behaviorlm.nn.model import BehaviorTransformer, ModelConfig
from behaviorlm.nn.training import TrainConfig, TrainHistory, train
from behaviorlm.recipes import BASE_PARAMS, DEFAULT_RECIPE, get_recipe
from behaviorlm.sequence.corpus import Corpus
from behaviorlm.sequence.shards import PreparedShards
from behaviorlm.sequence.tokenizer import N_SPECIAL, ActionTokenizer, EncodedSequences, with_request_times

log = logging.getLogger(__name__)

_ARCH_PARAMS = (
    "dim", "n_layers", "n_heads", "ffn_mult", "dropout", "copy_head", "copy_since", "gap_head", "time_context",
    "positions", "ffn",
)  # fmt: skip
_TOKENIZER_PARAMS = ("max_len", "min_item_count", "n_time_buckets", "value_buckets")
_TRAIN_PARAMS = tuple(TrainConfig.__dataclass_fields__)


class BehaviorLM:
    """Causal transformer recommender over (item, action, time-gap) sequences.

    Parameters
    ----------
    recipe:
        Named training recipe (``ml-1m`` -- the benchmarked default --, ``clickstream-small``,
        ``quick``; see :mod:`behaviorlm.recipes`). Every parameter below left at ``None`` takes
        the recipe's value.
    max_len:
        Tokens per sequence window (BOS included); inference keeps each user's newest ``max_len``.
    dim, n_layers, n_heads, ffn_mult:
        Width, depth, attention heads and feed-forward expansion of the transformer.
    dropout:
        Dropout on embeddings, attention outputs and feed-forward outputs.
    copy_head:
        Repeat-aware output (:mod:`behaviorlm.nn.copy_head`): the next-item distribution mixes
        the catalog softmax with a copy over the items of the user's own context, with a
        learned gate, so an item the user touched is ranked from its place in their history
        even when its embedding is barely trained. The clickstream recipes turn it on.
    copy_since:
        The copy head also reads, for each context item, whether the user touched it again
        later -- and with which action (a cart later bought, a view later carted): a learned
        bias per action, what the "in your cart" rule knows (``clickstream-small@3``).
    gap_head:
        Also predict *when*: a softmax over (next action, time-gap bucket) pairs trained with the
        rest (:mod:`behaviorlm.nn.gap_head`); :meth:`next_event_within` reads it as a zero-shot
        "P(purchase within h)". Give ``fit`` the data's ``observed_until`` so users' silence
        after their last event counts too.
    gap_loss_weight:
        Weight of the gap head's likelihood beside the next-item one.
    time_context:
        ``"history"`` (default): a prediction sees the gaps between past events only.
        ``"request"``: it also sees the time from the user's last event to the moment it is
        asked for -- in training the target event's time, in evaluation the test event's, in
        ``recommend``/``score`` the ``as_of`` time (default: now) -- so it can tell "back after
        a minute" from "back after a month". Every consumer of such a model supplies a time.
    positions:
        ``"learned"`` (default): a learned vector per window position, added to the input
        (SASRec). ``"rope"``: rotary embeddings on every layer's queries and keys, so attention
        reads how far apart two events are.
    ffn:
        The feed-forward of each block: ``"gelu"`` (default) or ``"swiglu"`` (gated; its first
        layer is twice as wide).
    min_item_count:
        Items seen fewer times in training become ``[UNK]`` (inputs only; never targets).
    n_time_buckets:
        Log2 time-gap buckets between consecutive events (24 covers gaps up to ~194 days).
    value_buckets:
        Quantile buckets for each event's ``amount`` and ``quantity`` (0: off), embedded at
        every position (measured in benchmarks/RESULTS.md section 19).
    side_features:
        Item-table columns (``category``, ``brand``) whose value embeddings are added to the
        item's, in the input and the tied output: rare items borrow strength from their category.
    epochs, batch_size, lr, weight_decay, warmup_frac, min_lr_frac, grad_clip:
        AdamW schedule: linear warm-up over ``warmup_frac`` of the steps, then cosine decay to
        ``min_lr_frac * lr``; weight decay on matrices only; gradient-norm clipping.
    loss:
        ``full`` softmax over the catalog, ``sampled`` softmax with ``n_negatives`` shared
        negatives, or ``auto`` (full up to 20k items, else sampled).
    n_negatives:
        Shared uniform negatives per batch with ``loss="sampled"``.
    action_loss_weight:
        Weight of the next-action cross-entropy beside the next-item one.
    patience, validate_every:
        Early stopping: validate every ``validate_every`` epochs, stop after ``patience``
        validations without improvement, keep the best weights.
    seed:
        Seeds weight initialisation, batch order and negative sampling (determinism is tested).
    progress:
        Show a progress bar per epoch.
    max_time_s:
        Stop after this many seconds of training (the best epoch so far is kept).
    max_steps:
        Stop after this many optimizer steps (fixed-work benchmarks; a checkpointed run
        continues from there when resumed with a larger value).
    sparse_embeddings:
        ``auto`` (default), ``on`` or ``off``: train the item table with row-sparse gradients
        and SparseAdam, so a step's cost and DDP's bytes follow the rows it touched, not the
        catalog (:mod:`behaviorlm.nn.optim`); ``auto`` does with the sampled loss.
    device:
        ``auto`` (default: a GPU when present), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``: where
        training runs (bf16 autocast on CUDA) and where the fitted model scores until
        :meth:`use_device` says otherwise (:mod:`behaviorlm.nn.device`). Not saved with the
        model: :meth:`load` takes its own.
    """

    #: how top-k lists are found until :meth:`use_retrieval` says otherwise (see there)
    retrieval_: str = "auto"
    retrieval_params_: IndexParams | None = None
    #: the training stages after pretraining, oldest first (:meth:`finetune`)
    stages_: list[dict[str, Any]] = []  # noqa: RUF012 - never mutated: finetune assigns a new list
    #: low-rank adapters by name (:meth:`fit_adapter`), and their merged networks (:meth:`with_adapter`)
    adapters_: dict[str, Adapter] = {}  # noqa: RUF012 - never mutated: fit_adapter assigns a new dict
    _adapted: dict[str, BehaviorTransformer] = {}  # noqa: RUF012 - replaced, never mutated, on the class

    name = "behaviorlm"

    def __init__(
        self,
        recipe: str = DEFAULT_RECIPE,
        *,
        max_len: int | None = None,
        dim: int | None = None,
        n_layers: int | None = None,
        n_heads: int | None = None,
        ffn_mult: int | None = None,
        dropout: float | None = None,
        copy_head: bool | None = None,
        copy_since: bool | None = None,
        gap_head: bool | None = None,
        time_context: str | None = None,
        positions: str | None = None,
        ffn: str | None = None,
        min_item_count: int | None = None,
        n_time_buckets: int | None = None,
        value_buckets: int | None = None,
        side_features: tuple[str, ...] | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        warmup_frac: float | None = None,
        min_lr_frac: float | None = None,
        grad_clip: float | None = None,
        loss: str | None = None,
        n_negatives: int | None = None,
        action_loss_weight: float | None = None,
        gap_loss_weight: float | None = None,
        patience: int | None = None,
        validate_every: int | None = None,
        seed: int | None = None,
        progress: bool | None = None,
        max_time_s: float | None = None,
        max_steps: int | None = None,
        sparse_embeddings: str | None = None,
        device: str | None = None,
    ):
        self.recipe = recipe
        for name, value in locals().items():
            if name in BASE_PARAMS:
                setattr(self, name, value)
        self._check_params()

    # ------------------------------------------------------------------ parameters
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments (scikit-learn protocol; ``clone`` works)."""
        return {"recipe": self.recipe, **{name: getattr(self, name) for name in BASE_PARAMS}}

    def set_params(self, **params: Any) -> BehaviorLM:
        unknown = sorted(set(params) - set(self.get_params()))
        if unknown:
            raise ConfigurationError(f"unknown BehaviorLM parameter(s) {unknown}")
        for name, value in params.items():
            setattr(self, name, value)
        self._check_params()
        return self

    def set_output(self, *, transform: Literal["polars", "pandas"] | None = None) -> BehaviorLM:
        """Choose the frame type that ``recommend``, ``next_action_proba``, ``embed`` and
        ``generate`` return (scikit-learn's ``set_output``): ``"pandas"`` for analysts whose
        tooling is pandas, ``"polars"`` (the default) otherwise. Inputs accept either always."""
        if transform not in (None, "polars", "pandas"):
            raise ConfigurationError(f"set_output(transform=...) must be 'polars' or 'pandas', got {transform!r}")
        self._output = transform or "polars"
        return self

    def _frame(self, df: pl.DataFrame) -> Any:
        """``df`` in the frame type chosen by :meth:`set_output` (polars unless asked otherwise)."""
        return df.to_pandas() if getattr(self, "_output", "polars") == "pandas" else df

    @property
    def params(self) -> dict[str, Any]:
        """Every effective parameter: the recipe's values with the explicit ones on top."""
        given = {name: getattr(self, name) for name in BASE_PARAMS if getattr(self, name) is not None}
        return {**get_recipe(self.recipe).params, **given}

    def _check_params(self) -> None:
        p = self.params
        TrainConfig(**{k: p[k] for k in _TRAIN_PARAMS})  # fail at construction, not after loading data
        ModelConfig(1, 1, 1, max_len=p["max_len"], **{k: p[k] for k in _ARCH_PARAMS})

    def __repr__(self) -> str:
        given = ", ".join(f"{n}={getattr(self, n)!r}" for n in BASE_PARAMS if getattr(self, n) is not None)
        return f"BehaviorLM(recipe={get_recipe(self.recipe).ref!r}{', ' + given if given else ''})"

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        events: Events | PreparedShards | Any,
        validation: Holdout | None = None,
        exclude_seen: bool = True,
        k_val: int = 10,
        items: Any = None,
        training_data: dict[str, Any] | None = None,
        *,
        checkpoint: Checkpointing | None = None,
        observed_until: Any = None,
    ) -> BehaviorLM:
        """Pretrain on ``events``; with a ``validation`` holdout, early-stop on its NDCG@k_val.

        ``events`` are raw events (any frame or :class:`Events`) or a
        :class:`~behaviorlm.sequence.shards.PreparedShards` folder (``behaviorlm prepare``), which
        is trained on memory-mapped, never loaded whole; such a model keeps no per-user
        histories, so it scores users from their events or from the shards.
        ``items`` (optional item metadata: ``item_id`` + title/category/brand/price) is validated
        and kept with the model, so downstream steps (segments, explanations) need no other copy.
        ``training_data`` (source, holdout, digest) is stored with the model so that evaluation
        can refuse a leaky split. The input schema of ``events`` is stored too, and applied to
        raw events everywhere the model is used later. ``checkpoint`` saves resumable training
        state and resumes from it (:mod:`behaviorlm.nn.checkpoint`). ``observed_until``: when
        the log ends for every user (a split's cut-off; never a leave-one-out split's, whose
        held-out events follow each history) -- a gap head then also learns from the silence
        after each user's last event.
        """
        p = self.params
        self.items_ = validate_items(items) if items is not None else None
        if isinstance(events, PreparedShards):
            self._check_prepared(events)
            # shards hold whole sequences; the model's max_len is what inference keeps per user
            self.tokenizer_ = ActionTokenizer.from_dict({**events.tokenizer.to_dict(), "max_len": p["max_len"]})
            self.input_schema_ = events.schema
            data: EncodedSequences | Corpus = events.corpus()
            n_events = int(events.report["rows_kept"])
        else:
            ev = as_events(events)
            self.input_schema_ = ev.schema or InputSchema()
            tok = ActionTokenizer(**{k: p[k] for k in _TOKENIZER_PARAMS}, side_columns=tuple(p["side_features"]))
            self.tokenizer_ = tok.fit(ev, self.items_)
            data, n_events = self.tokenizer_.encode(ev, truncate=False), len(ev)
        torch.manual_seed(p["seed"])
        self.model_ = BehaviorTransformer(self._network_config())
        self.model_.set_item_sides(torch.from_numpy(self.tokenizer_.item_sides_))
        if self.model_.copy_head is not None and not isinstance(events, PreparedShards):
            self._warm_start_copy(ev)
        self.exclude_seen_ = exclude_seen
        self.training_data_: dict[str, Any] | None = stage_record(
            training_data, None if isinstance(events, PreparedShards) else ev
        )
        censor = self._censor(data, observed_until)
        if self.model_.gap_head is not None and not isinstance(events, PreparedShards):
            self.model_.gap_head.span_s.fill_(self._observed_span(ev, observed_until))
        tcfg = TrainConfig(**{k: p[k] for k in _TRAIN_PARAMS})
        self._train(data, validation, exclude_seen, k_val, tcfg, checkpoint, censor)
        self.prepared_from_ = str(events.folder) if isinstance(events, PreparedShards) else None
        self.parent_version_: str | None = None
        if isinstance(events, PreparedShards):
            self._remember_none(events)
        else:
            self._remember_users(ev)
        self.context_ = self.histories_.clear()
        self._finish(n_events)
        return self.use_device(p["device"])  # trained there, scores there

    def _warm_start_copy(self, ev: Events) -> None:
        """Start the copy head at the "buy again" rule fitted on the training events (its
        half-life and action weights; :class:`~behaviorlm.evaluation.baselines.RepeatBaseline`),
        so the repeat-aware model begins where the strongest simple baseline is. Shards skip it
        (the default prior stays): the rule would need the events in memory."""
        assert self.model_.copy_head is not None
        rule = RepeatBaseline().fit(ev, ev.df["item_id"].unique(maintain_order=True))
        weights = torch.zeros(self.tokenizer_.n_actions)
        names = list(rule.weights_)
        weights[torch.from_numpy(self.tokenizer_.action_index(names, strict=False))] = torch.tensor(
            [rule.weights_[a] for a in names]
        )
        weights[N_SPECIAL:] = weights[N_SPECIAL:].clamp_min(rule.default_weight_)
        self.model_.copy_head.warm_start(rule.half_life_, weights)
        log.info("copy head starts at the repeat rule: half-life %g events, weights %s", rule.half_life_, rule.weights_)

    def fit_partial(
        self,
        events: Events | Any,
        validation: Holdout | None = None,
        k_val: int = 10,
        *,
        epochs: int | None = None,
        lr: float | None = None,
        checkpoint: Checkpointing | None = None,
        training_data: dict[str, Any] | None = None,
    ) -> BehaviorLM:
        """Continue training on new events (the daily increment) instead of retraining.

        The vocabulary grows: items and actions first seen in ``events`` get fresh embedding
        rows, every existing weight is kept (:meth:`BehaviorTransformer.grown`). Each user in
        ``events`` is trained on their remembered recent history followed by the new events, so
        the new events are predicted in context; users' histories and seen items are then
        updated. Events the model already holds (the same user, item, action, time and values
        as a remembered event -- a day that overlaps the last one) are dropped first, so none is
        trained on or counted twice. ``epochs`` and ``lr`` default to the model's parameters.

        ``training_data`` (source, holdout, digest) is appended to the model's training record
        as this continuation (holdout ``unknown`` if not given), so the record says what the
        model saw; evaluation refuses targets the model has now trained on
        (:func:`behaviorlm.evaluation.leakage.check_no_leak`).
        """
        engine = self.engine
        new = self._not_yet_held(self._in_model_ids(self.validate_input(events)))
        if self.histories_.height == 0:
            log.info("fit_partial: the model keeps no histories; training on the new events alone")
        combined = self._with_history(new)  # remembered context included: it is trained on now
        self.tokenizer_ = self.tokenizer_.extended(new)  # counts the new events only, once
        self.model_ = self.model_.grown(self.tokenizer_.n_items, self.tokenizer_.n_actions)
        self.model_.set_item_sides(torch.from_numpy(self.tokenizer_.item_sides_))
        p = {**self.params, **{k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}}
        tcfg = TrainConfig(**{k: p[k] for k in _TRAIN_PARAMS})
        seqs = self.tokenizer_.encode(combined, truncate=False)
        self._train(seqs, validation, self.exclude_seen_, k_val, tcfg, checkpoint)
        self.parent_version_ = engine.version
        self.training_data_ = with_increment(self.training_data_, stage_record(training_data, new))
        self._remember_users(combined, keep_others=True)
        trained = combined.df["user_id"].unique().implode()
        self.context_ = self.context_.filter(~pl.col("user_id").is_in(trained))
        self._finish(self.n_train_events_ + len(new))
        return self.use_device(p["device"])

    def finetune(
        self,
        events: Events | Any,
        method: str = "dpo",
        *,
        validation: Holdout | None = None,
        action: str = "purchase",
        window: str = "1d",
        contexts_per_user: int = 8,
        k_val: int = 10,
        **stage: Any,
    ) -> BehaviorLM:
        """A copy of this model fine-tuned toward ``action`` (purchases) on ``events``; this one is unchanged.

        ``method``: ``dpo``, ``sdpo``, ``grpo`` or ``sft`` (the control); see
        :mod:`behaviorlm.finetune`. Contexts are each user's newest ``contexts_per_user``
        ``action`` events in ``events`` -- give training-period events only: nothing later than
        what the model may learn from -- with the items touched within ``window`` of them and
        never bought as rejected ones. ``stage`` takes :class:`~behaviorlm.finetune.stages.StageConfig`
        fields (``beta``, ``negatives``, ``n_rejected``, ``epochs``, ``lr``, ...). With a
        ``validation`` holdout (held-out purchases) the epoch -- or the unchanged model -- with
        the best purchase-target NDCG@``k_val`` is kept. The copy records its parent version and
        the stage (``stages_``).
        """
        from behaviorlm.finetune.pairs import mine_pairs
        from behaviorlm.finetune.stages import StageConfig, finetune

        engine = self.engine
        cfg = StageConfig(method=method, **{"seed": self.params["seed"], "progress": self.params["progress"], **stage})
        action_id = engine.action_id(action)
        assert action_id is not None
        ev = self._in_model_ids(self.validate_input(events))
        pairs = mine_pairs(
            ev, self.tokenizer_, action=action, window=window, contexts_per_user=contexts_per_user,
            n_rejected=cfg.n_rejected, seed=cfg.seed,
        )  # fmt: skip
        tuned = copy.deepcopy(self)
        validate = None
        if validation is not None and validation.n_users:
            from behaviorlm.evaluation.purchase import ActionScorer

            catalog = pl.Series("item_id", self.tokenizer_.items_)

            def validate(model: BehaviorTransformer) -> float:
                tuned.engine_ = InferenceEngine(model, tuned.tokenizer_, version="finetuning")
                return mean_ndcg(ActionScorer(tuned, action), validation, catalog, k_val, exclude_seen=False)

        hist = finetune(tuned.model_, pairs, action_id, cfg, validate)
        log.info(
            "%s: %d contexts, %d pairs; validation %s -> %s (epoch %d kept)",
            method, hist.contexts, hist.pairs, hist.reference_score, hist.best_score, hist.best_epoch,
        )  # fmt: skip
        tuned.parent_version_ = engine.version
        tuned.stages_ = [*self.stages_, {**asdict(hist), "action": action, "parent_version": engine.version}]
        tuned.engine_ = InferenceEngine(tuned.model_, tuned.tokenizer_, version="finetuned")
        tuned._finish(tuned.n_train_events_)
        return tuned

    def fit_adapter(
        self,
        events: Events | Any,
        name: str,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        epochs: int = 3,
        lr: float = 1e-3,
        describe: dict[str, Any] | None = None,
    ) -> BehaviorLM:
        """Train a low-rank adapter called ``name`` on ``events`` (one segment's, one market's)
        with the pretraining objective, the base weights frozen (:mod:`behaviorlm.nn.lora`).

        The adapter is kept with the model (``adapters_``; saved beside the weights) and used by
        ``with_adapter(name)`` / ``recommend(adapter=name)``. ``describe`` (e.g. the segment
        column and value) is stored in its metadata; items the base does not know are ``[UNK]``
        to it, as to the base."""
        from behaviorlm.model_dir import Adapter, check_adapter_name
        from behaviorlm.nn.lora import adapter_state, add_adapters, count

        check_adapter_name(name)
        engine = self.engine
        ev = self._in_model_ids(self.validate_input(events))
        net = copy.deepcopy(self.model_)
        targets = add_adapters(net, rank, alpha)
        fixed = {"epochs": epochs, "lr": lr, "patience": epochs, "max_time_s": None, "max_steps": None}
        tcfg = TrainConfig(**{**{k: self.params[k] for k in _TRAIN_PARAMS}, **fixed})
        hist = train(net, self.tokenizer_.encode(ev, truncate=False), tcfg)
        state = adapter_state(net)
        meta = {
            "name": name, "base_version": engine.version, "rank": rank, "alpha": alpha, "targets": targets,
            "parameters": count(state), "base_parameters": self.model_.num_parameters(),
            "events": len(ev), "users": ev.n_users, "epochs": epochs, "lr": lr,
            "train_time_s": hist.train_time_s, "loss": [e["loss"] for e in hist.epochs],
            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(describe or {}),
        }  # fmt: skip
        self.adapters_ = {**self.adapters_, name: Adapter(state, meta)}
        self._adapted = {}
        return self

    def with_adapter(self, name: str | None) -> BehaviorLM:
        """This model with adapter ``name`` merged into a copy of its weights (``None``: itself).

        The copy shares everything else -- vocabulary, known users, retrieval index (adapters do
        not touch item embeddings) -- and scores at the base's cost; its version is
        ``<base version>+<name>``. Merged networks are cached per name."""
        if name is None:
            return self
        from behaviorlm.model_dir import check_adapter
        from behaviorlm.nn.lora import add_adapters, load_adapter_state, merged

        engine = self.engine
        if name not in self.adapters_:
            known = sorted(self.adapters_) or "none"
            raise ConfigurationError(
                f"unknown adapter {name!r}; this model has: {known}", cli_hint=f"--adapter must be one of: {known}"
            )
        if name not in self._adapted:
            adapter = check_adapter(self.adapters_[name], engine.version)
            net = copy.deepcopy(self.model_)
            add_adapters(net, adapter.meta["rank"], adapter.meta["alpha"], adapter.meta["targets"])
            load_adapter_state(net, adapter.state)
            self._adapted = {**self._adapted, name: merged(net).eval()}
        cached = self._adapted[name]
        other = copy.copy(self)
        other.model_ = cached
        adapted = InferenceEngine(cached, self.tokenizer_, f"{engine.version}+{name}", engine.index)
        other.engine_ = adapted.on(engine.device)  # scores where the base model scores
        return other

    def remember(self, events: Events | Any, source: str | None = None) -> BehaviorLM:
        """Know users' events up to now without training on them: what ``recommend(users=...)``,
        the service's known users and the pyfunc answer from. The weights and the model version
        are unchanged.

        The pipeline trains with the last events of each user held out (for validation and the
        evaluation), then remembers every event up to the scoring date, so the model it
        registers and serves knows the same history the batch scores of that day are computed
        from. Each user's events from their newest trained event on that the model does not
        already hold are kept (the most recent ones) as context, apart from the trained
        histories: the evaluation's leak check looks at what was trained on, and a remembered
        test target is not a training event. ``fit_partial`` trains on a user's context with
        their new events. Recorded in the training record as ``context``."""
        ev = self._in_model_ids(self.validate_input(events))
        newest = self.histories_.group_by("user_id").agg(pl.col("timestamp").max().alias("__newest"))
        df = ev.df.select(self.histories_.columns).join(newest, on="user_id", how="left")
        later = df.filter(pl.col("__newest").is_null() | (pl.col("timestamp") >= pl.col("__newest"))).drop("__newest")
        fresh = later.join(self.histories_, on=list(_IDENTITY), how="anti", nulls_equal=True)
        fresh = pl.concat([self.context_, fresh], how="vertical_relaxed").unique(maintain_order=True)
        self.context_ = self._most_recent(fresh.sort(["user_id", "timestamp"], maintain_order=True))
        seen = self.context_.select("user_id", "item_id")
        self.seen_ = pl.concat([self.seen_, seen], how="vertical_relaxed").unique(maintain_order=True)
        last = self.context_["timestamp"].max()
        record = {"source": source, "n_events": self.context_.height, "last_event": str(last)}
        self.training_data_ = {**(self.training_data_ or {}), "context": record}
        log.info("remembered %d events of %d users after training (not trained on)", *self._context_size())
        return self

    def _in_model_ids(self, ev: Events) -> Events:
        """``ev`` with user and item ids of the model's types, for events joined to what it
        remembers: a model trained on integer ids continued on a CSV (ids read as text) gets
        ``"7"`` as user 7 (:mod:`behaviorlm.data.ids`); an id that does not read as one is an
        error naming it, not a join that fails."""
        wanted = {"user_id": self.user_id_dtype(), "item_id": self.tokenizer_.item_polars_dtype}
        casts = []
        for col, dtype in wanted.items():
            have = ev.df[col]
            if have.dtype == dtype:
                continue
            cast = cast_ids(have, dtype)
            bad = have.filter(cast.is_null() & have.is_not_null())
            if len(bad):
                name = getattr(self.input_schema_.columns, col.split("_")[0]) or col  # the user's own column
                raise InputDataError(
                    f"column {name!r}: {bad[0]!r} does not read as this model's {dtype} ids "
                    f"({len(bad):,} such values); the model was trained with {dtype} {col.split('_')[0]} ids",
                    cli_hint=f"the model's {col.split('_')[0]} ids are {dtype}: give --events with ids of that kind",
                )
            casts.append(cast.alias(col))
        return ev.derive(ev.df.with_columns(casts), "ids read as the model's") if casts else ev

    def _context_size(self) -> tuple[int, int]:
        return self.context_.height, self.context_["user_id"].n_unique()

    def _not_yet_held(self, new: Events) -> Events:
        """``new`` without the events the model already holds: a multiset difference with the
        remembered histories on every column they share (two identical events in ``new`` and
        one remembered leaves one). Events older than a user's remembered window cannot be
        matched and are kept."""
        if self.histories_.height == 0:
            return new
        cols = [c for c in self.histories_.columns if c in new.df.columns]
        copy = pl.int_range(pl.len()).over(cols).alias("__copy")  # the n-th of identical events
        held = self.histories_.select(cols).with_columns(copy)
        numbered = new.df.with_row_index("__row").with_columns(copy)
        fresh = numbered.join(held, on=[*cols, "__copy"], how="anti", nulls_equal=True).sort("__row")
        n_held = len(new) - fresh.height
        if n_held == 0:
            return new
        if fresh.height == 0:
            raise InputDataError(
                f"all {len(new):,} new events are already held by the model (the same user, item, action and "
                "time as remembered events): nothing to continue on",
                cli_hint="--events holds no event after the ones --init-from's model was trained on",
            )
        log.info("fit_partial: %d of %d events the model already holds are not trained on again", n_held, len(new))
        return new.derive(fresh.drop("__row", "__copy"), f"without {n_held} events the model already holds")

    def _with_history(self, new: Events) -> Events:
        """The new events of each of their users, after that user's remembered history (trained
        and context; a context event the new events deliver again comes once)."""
        past = self._known(new.df["user_id"].unique())
        if past.height == 0:
            return new
        past = past.join(new.df.select(_IDENTITY), on=list(_IDENTITY), how="anti", nulls_equal=True)
        both = pl.concat([past, new.df.select(past.columns)], how="vertical_relaxed")
        return Events.trusted(both.sort(["user_id", "timestamp"], maintain_order=True), "history + new events")

    def _network_config(self) -> ModelConfig:
        p = self.params
        return ModelConfig(
            self.tokenizer_.n_items,
            self.tokenizer_.n_actions,
            self.tokenizer_.n_gaps,
            max_len=p["max_len"],
            value_sizes=self.tokenizer_.value_sizes,
            side_sizes=self.tokenizer_.side_sizes,
            **{k: p[k] for k in _ARCH_PARAMS},
        )

    def _check_prepared(self, prepared: PreparedShards) -> None:
        tok, p = prepared.tokenizer, self.params
        for name in ("min_item_count", "n_time_buckets"):
            if getattr(tok, name) != p[name]:
                raise ConfigurationError(
                    f"{prepared.folder} was prepared with {name}={getattr(tok, name)} but the model has "
                    f"{name}={p[name]}: prepare again or pass {name}={getattr(tok, name)}"
                )

    def _censor(self, data: EncodedSequences | Corpus, observed_until: Any) -> np.ndarray | None:
        """Per user, where the silence from their last event to ``observed_until`` ends on the gap
        head's bucket axis (None: unknown)."""
        if observed_until is None:
            return None
        if not isinstance(data, EncodedSequences) or data.last_times is None:
            raise ConfigurationError("observed_until needs events, not prepared shards (they keep no event times)")
        end = unix_micros(to_utc(observed_until, "observed_until")) / 1e6
        late = np.flatnonzero(data.last_times > end)
        if len(late):
            raise InputDataError(
                f"observed_until is before the last event of {len(late)} user(s), e.g. {data.user_ids[late[0]]!r}"
            )
        return censor_positions(end - data.last_times, self.tokenizer_.n_gaps)

    @staticmethod
    def _observed_span(ev: Events, observed_until: Any) -> float:
        """Seconds from the first training event to the end of observation: no gap longer than
        this could be seen, so the gap head does not extrapolate past it."""
        end = to_utc(observed_until, "observed_until") if observed_until is not None else ev.end
        return (end - to_utc(ev.df["timestamp"].min(), "first event")).total_seconds()

    def _train(
        self,
        data: EncodedSequences | Corpus,
        validation: Holdout | None,
        exclude_seen: bool,
        k_val: int,
        tcfg: TrainConfig,
        checkpoint: Checkpointing | None,
        censor: np.ndarray | None = None,
    ) -> None:
        """Train ``self.model_`` on ``data``, early-stopping on ``validation``'s NDCG@k_val."""
        self.engine_ = InferenceEngine(self.model_, self.tokenizer_, version="training")
        validate = None
        if validation is not None and validation.n_users:
            catalog = pl.Series("item_id", self.tokenizer_.items_)
            metric = f"ndcg@{k_val}"
            seen = seen_lists(validation.inputs, catalog) if exclude_seen else {}

            def score() -> float:
                return mean_ndcg(self, validation, catalog, k_val, exclude_seen, seen)

            def validate(model: BehaviorTransformer) -> float:
                if model.copy_head is None:
                    return score()
                return calibrate_gate(model.copy_head, score, GATE_SHIFTS_COARSE)[1]  # kept with the epoch

        distributed.init_from_env(tcfg.device)
        self.history_: TrainHistory = train(
            self.model_, data, tcfg, validate, self._log_epoch, checkpoint=checkpoint, censor=censor
        )
        if validate is not None and self.model_.copy_head is not None and distributed.current().is_main:
            shift, value = calibrate_gate(self.model_.copy_head, score)
            log.info("copy gate shift %.1f chosen on validation (%s %.4f)", shift, metric, value)

    def _finish(self, n_events: int) -> None:
        self.fitted_at_ = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.n_train_events_ = n_events
        self.model_version_ = model_version(self.model_)
        self.engine_.version = self.model_version_

    def _log_epoch(self, stats: dict) -> None:
        """One line per epoch -- what the pipelines and the demo show while a model trains: loss,
        validation metric, speed, and the time left if every remaining epoch runs (early
        stopping may end sooner)."""
        val = f" val={stats['val_score']:.4f}" if "val_score" in stats else ""
        left = max(0, self.params["epochs"] - stats["epoch"]) * stats.get("seconds", 0.0)
        log.info(
            "epoch %d/%d loss=%.4f%s %.0f tok/s, at most %.0f s left",
            stats["epoch"], self.params["epochs"], stats["loss"], val, stats["tokens_per_s"], left,
        )  # fmt: skip

    histories_: pl.DataFrame  # each user's last max_len + 1 trained events (see _memory)
    context_: pl.DataFrame  # events remembered after training, not trained on (remember)
    seen_: pl.DataFrame

    def _memory(self) -> int:
        """Events remembered per user: the ``max_len`` an input holds, and one more -- the oldest
        one gives its successor the time gap it has in the full history (without it, a known
        user's encoding would differ from the batch's over all their events)."""
        return int(self.params["max_len"]) + 1

    def _most_recent(self, df: pl.DataFrame) -> pl.DataFrame:
        """Each user's last :meth:`_memory` rows of ``df`` (sorted by user, then time)."""
        n = pl.len().over("user_id").cast(pl.Int64)  # UInt32 would underflow for short users
        return df.filter(pl.int_range(pl.len()).over("user_id") >= n - self._memory())

    def _remember_users(self, ev: Events, keep_others: bool = False) -> None:
        """Keep what recommend(users=...) needs: recent events and the seen-item sets
        (``keep_others``: users absent from ``ev`` keep what was remembered of them)."""
        df = ev.df
        recent = self._most_recent(df)
        seen = df.select("user_id", "item_id").unique(maintain_order=True)
        if keep_others:
            users = df["user_id"].unique().implode()
            others = self.histories_.filter(~pl.col("user_id").is_in(users)).select(recent.columns)
            recent = pl.concat([others, recent], how="vertical_relaxed").sort("user_id", maintain_order=True)
            seen = pl.concat([self.seen_, seen], how="vertical_relaxed").unique(maintain_order=True)
        self.histories_, self.seen_ = recent, seen

    def _remember_none(self, prepared: PreparedShards) -> None:
        """A model trained from shards keeps no per-user events (they may be billions); empty
        tables of the right types, so recommend(users=...) answers with a clear error instead."""
        user_t = prepared.user_ids(prepared.shards[0]).dtype
        item_t = prepared.tokenizer.item_polars_dtype
        schema: dict[str, Any] = {
            "user_id": user_t,
            "item_id": item_t,
            "event_type": pl.String,
            "timestamp": pl.Datetime("us", "UTC"),
        }
        self.histories_ = pl.DataFrame(schema=schema)
        self.seen_ = pl.DataFrame(schema={"user_id": user_t, "item_id": item_t})

    @property
    def engine(self) -> InferenceEngine:
        """The fitted model's inference engine (raises :class:`NotFittedError` before ``fit``)."""
        if not hasattr(self, "engine_"):
            raise NotFittedError("BehaviorLM is not fitted: call fit(events) or BehaviorLM.load(dir)")
        return self.engine_

    # ------------------------------------------------------------------ the data boundary
    def validate_input(self, events: Events | Any) -> Events:
        """Raw events -> :class:`Events`, read with the input schema the model was trained with."""
        self.engine  # noqa: B018 - fitted check
        return as_events(events, schema=self.input_schema_)

    def history_events(self) -> Events:
        """What the model knows of each user, as validated events: their last ``max_len``
        trained events (and one more, see :meth:`_memory`) followed by the events remembered since
        (:meth:`remember`)."""
        return Events.trusted(self._known(), "the model's remembered histories")

    def _known(self, users: pl.Series | None = None) -> pl.DataFrame:
        hist, ctx = self.histories_, self.context_
        if users is not None:
            hist, ctx = (
                hist.filter(pl.col("user_id").is_in(users.implode())),
                ctx.filter(pl.col("user_id").is_in(users.implode())),
            )
        if ctx.height == 0:
            return hist
        both = pl.concat([hist, ctx.select(hist.columns)], how="vertical_relaxed")
        both = both.sort("user_id", "timestamp", maintain_order=True)  # stable: trained events first on ties
        return self._most_recent(both)

    def user_id_dtype(self) -> pl.DataType:
        return self.histories_["user_id"].dtype

    def _encode_users(self, users: list[Any] | None, events: Any) -> tuple[EncodedSequences, pl.DataFrame, list[Any]]:
        """Encoded input sequences, the seen (user, item) pairs, and users without any events."""
        engine = self.engine
        if events is not None:
            df = self.validate_input(events).df
            if users is not None:
                df = df.filter(pl.col("user_id").is_in(_ids_as(users, df["user_id"].dtype).implode()))
            seen = df.select("user_id", "item_id").unique()
        else:
            if self.prepared_from_:
                raise InputDataError(
                    f"this model was trained from prepared shards ({self.prepared_from_}) and keeps no user "
                    "histories: pass events=..., or score the shards (behaviorlm score --prepared DIR)"
                )
            if users is None:
                users = self.histories_["user_id"].unique(maintain_order=True).to_list()
            u = _ids_as(users, self.user_id_dtype())
            df = self._known(u)
            seen = self.seen_.filter(pl.col("user_id").is_in(u.implode()))
        enc = engine.encode(Events.trusted(df, "users to score"))
        cold = [] if users is None else _without(users, df["user_id"].dtype, set(enc.user_ids))
        return enc, seen, cold

    # ------------------------------------------------------------------ public API
    def recommend(
        self,
        users: list[Any] | None = None,
        *,
        events: Any = None,
        k: int = 10,
        exclude_seen: bool = True,
        allowed_items: list[Any] | None = None,
        action: str | None = None,
        batch_size: int = 128,
        adapter: str | None = None,
        as_of: Any = None,
    ) -> pl.DataFrame:
        """Top-``k`` items per user as ``user_id, item_id, score, rank`` (score = probability).

        ``users`` alone uses the histories remembered at fit time; ``events`` (raw events of any
        users, seen in training or not) are encoded on the fly. ``action`` ranks by
        ``P(item | next action = action)``; the default marginalises over action types.
        Users without events get the most popular items (cold start) with ``score`` = their
        training share. ``adapter`` scores with that low-rank adapter (:meth:`with_adapter`).
        ``as_of``: the request time a request-time model conditions on (default: now); it must
        not precede a user's last event.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigurationError(f"k must be a positive integer, got {k!r}")
        if adapter is not None:
            return self.with_adapter(adapter).recommend(
                users, events=events, k=k, exclude_seen=exclude_seen, allowed_items=allowed_items, action=action,
                batch_size=batch_size, as_of=as_of,
            )  # fmt: skip
        engine = self.engine
        enc, seen, cold = self._encode_users(users, events)
        enc = with_request_times(enc, as_of)
        allowed = engine.allowed_mask(allowed_items)
        seen_rc = engine.seen_pairs(seen, enc.user_ids) if exclude_seen else NO_SEEN
        # seen items kept: a repeat-aware model may return a new item the user just touched
        frames = [engine.recommend(enc, k, seen_rc, allowed, action, batch_size, new_items=not exclude_seen)]
        if cold:
            log.info("recommend: %d user(s) without events get popular items (cold start)", len(cold))
            frames.append(engine.popular(cold, k, allowed))
        frames = [f for f in frames if f.height]
        return self._frame(pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame(schema=FRAME_SCHEMA))

    def next_action_proba(
        self, users: list[Any] | None = None, *, events: Any = None, batch_size: int = 128
    ) -> pl.DataFrame:
        """``user_id``, one ``p_<action>`` column per action type, and ``predicted_action``."""
        enc, _, _ = self._encode_users(users, events)
        names = self.engine.action_names
        probs = self.engine.action_proba(enc, batch_size)
        out = pl.DataFrame({"user_id": enc.user_ids}) if len(enc) else pl.DataFrame({"user_id": []})
        out = out.with_columns(**{f"p_{a}": probs[:, j] for j, a in enumerate(names)})
        pred = [names[j] for j in probs.argmax(1)] if len(probs) else []
        return self._frame(out.with_columns(predicted_action=pl.Series(pred, dtype=pl.String)))

    def next_event_within(
        self,
        horizon: Any,
        users: list[Any] | None = None,
        *,
        events: Any = None,
        action: str | None = None,
        as_of: Any = None,
    ) -> pl.DataFrame:
        """``user_id, p``: the gap head's zero-shot probability that the user's next event --
        of ``action`` (e.g. ``"purchase"``), or any -- comes within ``horizon`` (``"13w"``,
        ``"30d"``, a timedelta or seconds) after ``as_of`` (default now), given that nothing
        happened between their last event and ``as_of``. No labels, no fine-tuning: what the
        pretrained model says about *when*."""
        from behaviorlm.propensity.labels import parse_duration

        enc, _, _ = self._encode_users(users, events)
        enc = with_request_times(enc, as_of)
        p = self.engine.within(enc, parse_duration(horizon).total_seconds(), action)
        return self._frame(pl.DataFrame({"user_id": enc.user_ids, "p": p}))

    def embed(self, users: list[Any] | None = None, *, events: Any = None) -> pl.DataFrame:
        """``user_id`` plus the L2-normalised hidden state after each user's latest event."""
        enc, _, _ = self._encode_users(users, events)
        if len(enc) == 0:
            raise InputDataError("no user has events to embed")
        return self._frame(pl.DataFrame({"user_id": enc.user_ids, "embedding": self.engine.embeddings(enc)}))

    def generate(self, users: list[Any] | None = None, *, events: Any = None, **decode_kwargs: Any) -> pl.DataFrame:
        """Decode the next actions as (action, item) trajectories; see :mod:`behaviorlm.inference.decoding`.

        ``decode_kwargs`` are :class:`~behaviorlm.inference.decoding.DecodeConfig` fields: ``n_steps``,
        ``method`` (greedy | sample | beam), ``temperature``, ``top_k``, ``top_p``,
        ``beam_width``, ``n_samples``, ``seed``. Users without events are skipped.
        """
        from behaviorlm.inference.decoding import DecodeConfig, decode

        cfg = DecodeConfig(**decode_kwargs)
        enc, _, _ = self._encode_users(users, events)
        return self._frame(decode(self.engine, enc, cfg))

    @property
    def time_context_(self) -> str:
        """What the fitted network knows about time: ``"history"`` or ``"request"`` (``time_context``)."""
        return self.engine.time_context

    def score(
        self,
        inputs: Events,
        users: list[Any],
        catalog: pl.Series,
        chunk: int = 256,
        action: str | None = None,
        as_of: Any = None,
    ):
        """Scorer protocol for :mod:`behaviorlm.evaluation`: log-probs over ``catalog``
        (marginal over next actions, or given ``action``: the purchase protocol's ranking).
        ``as_of``: the request time of a request-time model (one time, or one per user as a
        ``{user_id: time}`` mapping: the evaluation passes each target's own time)."""
        engine = self.engine
        enc = with_request_times(engine.encode(inputs), as_of)
        pos = {u: i for i, u in enumerate(enc.user_ids)}
        missing = [u for u in users if u not in pos]
        if missing:
            raise InputDataError(f"{len(missing)} evaluated user(s) have no input events, e.g. {missing[0]!r}")
        cols = torch.from_numpy(self.tokenizer_.item_index(catalog))
        new_cols = catalog_index(catalog, enc.new_ids) if enc.new_ids is not None else None
        for i in range(0, len(users), chunk):
            part = users[i : i + chunk]
            sub = enc.subset([pos[u] for u in part])
            for rows, lp, _ in engine.iter_scores(sub, action, chunk, new_items=True):
                yield part, _with_new_columns(lp[:, cols], lp, sub, rows, new_cols, engine.n_items)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, force: bool = False) -> Path:
        """Write a self-describing model directory (atomically; see :mod:`behaviorlm.model_dir`).
        An existing folder is replaced only if it is a model folder (or empty), unless ``force``."""
        self.engine  # noqa: B018 - fitted check
        manifest = {
            "recipe": get_recipe(self.recipe).ref,
            "params": {k: v for k, v in self.params.items() if k != "device"},  # where it runs is the loader's choice
            "input_schema": self.input_schema_.to_dict(),
            "history": asdict(self.history_),
            "fitted_at": self.fitted_at_,
            "n_train_events": self.n_train_events_,
            "exclude_seen": self.exclude_seen_,
            "training_data": self.training_data_,
            "prepared_from": self.prepared_from_,
            "parent_version": self.parent_version_,
            "stages": self.stages_,
        }
        files = ModelFiles(
            self.model_, self.tokenizer_, self.histories_, self.seen_, self.items_, manifest, self.context_,
            self.adapters_,
        )  # fmt: skip
        written = write_model_dir(directory, files, force)
        self.model_version_ = written["model_version"]
        if self.engine_.version != self.model_version_:  # loaded from a format that named versions otherwise
            self.engine_ = self.engine_.renamed(self.model_version_)  # the same runtime (torch or ONNX)
        self.use_retrieval(self.retrieval_, self.retrieval_params_, directory=directory)  # an index: beside the model
        return Path(directory)

    def use_retrieval(
        self,
        mode: str = "auto",
        params: IndexParams | None = None,
        directory: str | Path | None = None,
        users: EncodedSequences | None = None,
    ) -> BehaviorLM:
        """How top-k lists are found from now on: ``exact`` (the full catalog), ``ann`` (two-stage
        retrieval through an HNSW index over the item embeddings, re-scored exactly; see
        :mod:`behaviorlm.inference.retrieval`) or ``auto`` (from
        :data:`~behaviorlm.inference.retrieval.ANN_MIN_ITEMS` items up an index is built, and
        each path -- the service's micro-batches, batch scoring -- ranks the way that measured
        cheaper for it on the known users). With ``directory`` the index stored there is used if
        it matches this model, else built (its search depth tuned to 0.995 recall@10 against
        exact ranking on a sample of the known users, each path timed both ways) and stored there.
        ``users`` (encoded sequences) calibrate it instead of the known users: for a model trained
        from prepared shards, which keeps none (:meth:`PreparedShards.sample`)."""
        engine = self.engine
        self.retrieval_, self.retrieval_params_ = mode, params
        index = None
        if wants_ann(mode, engine.n_items):  # a new index calibrates itself on the known users
            if users is None and len(self.histories_):
                users = engine.encode(self.history_events())
            index = open_index(directory, engine.on("cpu"), params, users).routed(mode == "auto")
        self.engine_ = engine.with_index(index)
        return self

    def use_device(self, device: str = "auto") -> BehaviorLM:
        """Score on ``device`` from now on (``auto``: a GPU when present; see
        :mod:`behaviorlm.nn.device`): a copy of the network goes there -- the weights this model
        saves and fine-tunes stay on the CPU -- and every scoring path keeps its CPU inputs and
        outputs. On an accelerator the whole catalog is ranked there (an ANN index searches on the CPU)."""
        self.engine_ = self.engine.on(resolve_device(device))
        return self

    def use_compile(self, warm: bool = True) -> BehaviorLM:
        """Run the transformer's forward through ``torch.compile`` from now on
        (:meth:`InferenceEngine.compiled`: ~40% less per request on the service's path on CPU, after
        ~35 s of compiling); ``warm`` compiles now rather than on the first call. The torch engine only."""
        if type(self.engine) is not InferenceEngine:
            raise ConfigurationError(
                "compiling applies to the torch engine; this model runs on onnxruntime",
                cli_hint="--compile applies to --engine torch",
            )
        self.engine_ = self.engine.compiled()
        if warm:
            self.engine_.warm()
        return self

    def use_engine(self, kind: str = "torch", directory: str | Path | None = None) -> BehaviorLM:
        """Run the transformer on ``torch`` or on onnxruntime (``onnx``, ``onnx-int8``) from now on;
        see :mod:`behaviorlm.inference.onnx_engine`. With ``directory`` (the model's folder) the
        export kept there is reused when it matches these weights."""
        from behaviorlm.inference.onnx_engine import onnx_engine

        self.engine_ = onnx_engine(self.engine, kind, directory)
        return self

    @classmethod
    def load(cls, directory: str | Path, retrieval: str = "auto", device: str = "auto") -> BehaviorLM:
        """A saved model; ``retrieval`` as in :meth:`use_retrieval` (the stored index is reused),
        ``device`` as in :meth:`use_device`."""
        files = read_model_dir(directory)
        meta = files.manifest
        recipe = meta.get("recipe") or DEFAULT_RECIPE
        params = {k: v for k, v in meta["params"].items() if k in BASE_PARAMS}
        est = cls(recipe, **params)
        est.model_, est.tokenizer_ = files.network, files.tokenizer
        est.histories_, est.seen_, est.items_ = files.histories, files.seen, files.items
        est.context_ = files.context if files.context is not None else files.histories.clear()
        est.input_schema_ = files.input_schema
        est.history_ = TrainHistory(**meta["history"])
        est.fitted_at_, est.n_train_events_ = meta["fitted_at"], meta["n_train_events"]
        est.exclude_seen_ = meta.get("exclude_seen", True)
        est.training_data_ = meta.get("training_data")
        est.prepared_from_, est.parent_version_ = meta.get("prepared_from"), meta.get("parent_version")
        est.stages_ = meta.get("stages", [])
        est.adapters_, est._adapted = files.adapters, {}
        est.model_version_ = meta["model_version"]
        est.engine_ = InferenceEngine(est.model_, est.tokenizer_, est.model_version_)
        return est.use_retrieval(retrieval, directory=directory).use_device(device)

    @property
    def model_version(self) -> str:
        return self.engine.version


_IDENTITY = ("user_id", "item_id", "event_type", "timestamp")  # what makes two events the same


def _ids_as(users: list[Any], dtype: pl.DataType) -> pl.Series:
    """Caller ids in the model's id type (``3`` finds user ``"3"``; an uncastable id finds nobody)."""
    return pl.Series("user_id", [None if u is None else str(u) for u in users]).cast(dtype, strict=False)


def _without(users: list[Any], dtype: pl.DataType, found: set[Any]) -> list[Any]:
    """The caller's ids (as given) of the users who have no events: the cold-start ones."""
    cast = _ids_as(users, dtype).to_list()
    return sorted({u for u, c in zip(users, cast, strict=True) if c not in found}, key=str)


def _with_new_columns(
    out: torch.Tensor,
    logp: torch.Tensor,
    enc: EncodedSequences,
    rows: slice,
    new_cols: np.ndarray | None,
    n_items: int,
) -> torch.Tensor:
    """Scores over a catalog, with each row's new context items (outside the vocabulary, at
    ``n_items + first position`` of ``logp``) copied into their catalog columns where the
    catalog has them -- so evaluation can credit a model that returns an item just touched."""
    codes = enc.padded_new_codes(rows)
    if new_cols is None or codes is None or logp.shape[1] == n_items:
        return out
    first = first_positions(codes)
    r, j = np.nonzero(first == np.arange(codes.shape[1])[None, :])  # each new item's first position
    col = new_cols[codes[r, j]]
    keep = col >= 0
    out[torch.from_numpy(r[keep]), torch.from_numpy(col[keep])] = logp[r[keep], n_items + j[keep]]
    return out
