"""Decoding the next N actions: greedy, temperature / top-k / top-p sampling, beam search.

A step is an (action type, item) pair with joint log-probability
``log P(a | h) + log P(i | h, a)``; the candidates of one step are all ``A x I`` pairs, flattened
into one axis so that every method below works on a plain ``(batch, candidates)`` tensor. The
maths lives in small pure functions (``apply_temperature``, ``top_k_filter``, ``top_p_filter``)
so the tests can prove it on tiny vocabularies.

Generated steps are appended to the history with the user's most recent time-gap bucket (the
future gap is unknown; the last one is the best single guess and keeps the input in-distribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
import torch

from behaviorlm.errors import ConfigurationError
from behaviorlm.inference.engine import InferenceEngine
from behaviorlm.sequence.tokenizer import N_SPECIAL, EncodedSequences

Method = Literal["greedy", "sample", "beam"]
TRAJECTORY_COLUMNS = ("user_id", "trajectory", "step", "action", "item_id", "step_logprob", "logprob")
NEG_INF = float("-inf")


# --------------------------------------------------------------------------- pure maths


def apply_temperature(logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Renormalised ``log softmax(logp / T)``; ``T -> 0`` puts all mass on the argmax."""
    if temperature < 0:
        raise ConfigurationError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        out = torch.full_like(logp, NEG_INF)
        return out.scatter_(-1, logp.argmax(-1, keepdim=True), 0.0)
    return torch.log_softmax(logp / temperature, -1)


def top_k_filter(logp: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` most likely candidates (renormalised); the rest get -inf."""
    if k < 1:
        raise ConfigurationError(f"top_k must be >= 1, got {k}")
    k = min(k, logp.shape[-1])
    kth = torch.topk(logp, k, dim=-1).values[..., -1:]
    return torch.log_softmax(logp.masked_fill(logp < kth, NEG_INF), -1)


def top_p_filter(logp: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely candidates whose mass is >= ``p``."""
    if not 0 < p <= 1:
        raise ConfigurationError(f"top_p must be in (0, 1], got {p}")
    sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_logp.exp(), -1) - sorted_logp.exp()
    drop_sorted = mass_before >= p  # a candidate is needed only while the mass so far is < p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logp.masked_fill(drop, NEG_INF), -1)


def sample(logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from ``exp(logp)``."""
    return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- model side


@dataclass
class DecodeConfig:
    n_steps: int = 3
    method: Method = "greedy"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    beam_width: int = 5
    n_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("greedy", "sample", "beam"):
            raise ConfigurationError(f"method must be greedy, sample or beam, got {self.method!r}")
        if self.n_steps < 1 or self.n_steps > 50:
            raise ConfigurationError(f"n_steps must be in [1, 50], got {self.n_steps}")
        if self.beam_width < 1 or self.n_samples < 1:
            raise ConfigurationError("beam_width and n_samples must be >= 1")
        apply_temperature(torch.zeros(1), self.temperature)  # validates
        if self.top_k is not None:
            top_k_filter(torch.zeros(1), self.top_k)
        if self.top_p is not None:
            top_p_filter(torch.zeros(1), self.top_p)


@dataclass
class Trajectory:
    items: list[int]
    actions: list[int]
    gaps: list[int]
    steps: list[tuple[int, int, float]]  # (action id, item id, step log-prob)
    logprob: float = 0.0


def encode_paths(paths: list[Trajectory], max_len: int) -> EncodedSequences:
    lens = [min(len(p.items), max_len) for p in paths]
    cat = lambda f: np.concatenate([np.asarray(getattr(p, f)[-max_len:], np.int64) for p in paths])  # noqa: E731
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return EncodedSequences(list(range(len(paths))), offsets, cat("items"), cat("actions"), cat("gaps"))


def extend_path(path: Trajectory, cand: int, n_items: int, step_logp: float) -> Trajectory:
    a, i = cand // n_items + N_SPECIAL, cand % n_items + N_SPECIAL
    return Trajectory(
        path.items + [i],
        path.actions + [a],
        path.gaps + [path.gaps[-1]],
        path.steps + [(a, i, step_logp)],
        path.logprob + step_logp,
    )


def _step_candidates(
    logp: torch.Tensor, paths: list[Trajectory], cfg: DecodeConfig, gen: torch.Generator, n_items: int
) -> list[Trajectory]:
    """Advance every path by one step according to the decoding method."""
    if cfg.method == "beam":
        total = torch.tensor([p.logprob for p in paths], dtype=logp.dtype)[:, None] + logp
        best = torch.topk(total.flatten(), min(cfg.beam_width, total.numel())).indices
        rows, chosen = best // logp.shape[1], best % logp.shape[1]
    elif cfg.method == "greedy":
        rows, chosen = torch.arange(len(paths)), logp.argmax(1)
    else:
        dist = apply_temperature(logp, cfg.temperature)
        if cfg.top_k is not None:
            dist = top_k_filter(dist, cfg.top_k)
        if cfg.top_p is not None:
            dist = top_p_filter(dist, cfg.top_p)
        rows, chosen = torch.arange(len(paths)), sample(dist, gen)
    return [extend_path(paths[int(r)], int(c), n_items, float(logp[r, c])) for r, c in zip(rows, chosen, strict=True)]


def decode(engine: InferenceEngine, enc: EncodedSequences, cfg: DecodeConfig) -> pl.DataFrame:
    """Trajectories of the next ``cfg.n_steps`` actions for every user in ``enc``.

    Returns ``user_id, trajectory, step, action, item_id, step_logprob, logprob`` where
    ``logprob`` is the trajectory's total log-probability under the model (not under the
    tempered/filtered sampling distribution). Greedy gives one trajectory per user, sampling
    ``n_samples``, beam search ``beam_width`` ranked by log-probability.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    n_items = engine.n_items - N_SPECIAL
    max_len = engine.max_len
    frames = []
    for u in range(len(enc)):
        items, actions, gaps = (x.tolist() for x in enc.sequence(u))
        width = cfg.n_samples if cfg.method == "sample" else 1
        paths = [Trajectory(items, actions, gaps, []) for _ in range(width)]
        for _ in range(cfg.n_steps):
            logp = engine.joint_step_logp(encode_paths(paths, max_len))
            paths = _step_candidates(logp, paths, cfg, gen, n_items)
        if cfg.method == "beam":
            paths.sort(key=lambda p: -p.logprob)
        frames.append(_paths_frame(engine, enc.user_ids[u], paths))
    return pl.concat(frames) if frames else pl.DataFrame(schema=list(TRAJECTORY_COLUMNS))


def _paths_frame(engine: InferenceEngine, user: Any, paths: list[Trajectory]) -> pl.DataFrame:
    recs = [(t, s + 1, a, i, lp, p.logprob) for t, p in enumerate(paths) for s, (a, i, lp) in enumerate(p.steps)]
    t, s, a, i, lp, tot = (list(col) for col in zip(*recs, strict=True))
    return pl.DataFrame(
        {
            "user_id": [user] * len(recs),
            "trajectory": t,
            "step": s,
            "action": engine.tokenizer.decode_actions(a),
            "item_id": engine.tokenizer.decode_items(np.array(i)).tolist(),
            "step_logprob": lp,
            "logprob": tot,
        }
    )
