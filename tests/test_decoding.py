"""Decoding maths, proven on tiny vocabularies, and decoding with a real (tiny) model."""

from __future__ import annotations

import itertools
import math

import polars as pl
import pytest
import torch

from behaviorlm.data.events import Events, validate_events
from behaviorlm.inference.decoding import (
    DecodeConfig,
    apply_temperature,
    decode,
    top_k_filter,
    top_p_filter,
)
from behaviorlm.recommender import BehaviorLM
from behaviorlm.sequence.tokenizer import SPECIAL_TOKENS
from tests.conftest import make_events


def test_temperature_to_zero_equals_greedy():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 11), -1)
    for t in (1e-3, 1e-6):
        cold = apply_temperature(logp, t).exp()
        assert torch.equal(cold.argmax(1), logp.argmax(1))
        assert (cold.max(1).values > 0.999).all()
    assert torch.equal(apply_temperature(logp, 0).exp().argmax(1), logp.argmax(1))
    torch.testing.assert_close(apply_temperature(logp, 1.0), logp)


def test_top_p_keeps_the_smallest_set_with_mass_at_least_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logp = probs.log()
    for p, expect in ((0.5, 1), (0.51, 2), (0.7, 2), (0.71, 3), (0.86, 4), (1.0, 5)):
        kept = torch.isfinite(top_p_filter(logp, p)).sum().item()
        assert kept == expect, (p, kept)
        assert probs[0, :kept].sum() >= p - 1e-6 and (kept == 1 or probs[0, : kept - 1].sum() < p)
    shuffled = logp[:, [3, 0, 4, 1, 2]]
    assert torch.isfinite(top_p_filter(shuffled, 0.7)).tolist() == [[False, True, False, True, False]]


def test_filters_and_temperature_give_distributions():
    torch.manual_seed(1)
    logp = torch.log_softmax(torch.randn(4, 30), -1)
    for out in (
        apply_temperature(logp, 0.7),
        top_k_filter(logp, 5),
        top_p_filter(logp, 0.9),
        apply_temperature(logp, 3),
    ):
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(4))
    assert (torch.isfinite(top_k_filter(logp, 5)).sum(1) == 5).all()


def test_bad_parameters():
    for kw in (
        {"temperature": -1.0},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"method": "magic"},
        {"n_steps": 0},
    ):
        with pytest.raises(ValueError):
            DecodeConfig(**kw)


@pytest.fixture(scope="module")
def tiny():
    # 3 items x 2 actions: 6 candidates per step, so brute force over 3 steps is 216 paths
    ev = make_events(n_users=12, n_items=3, length=8)
    ev = ev.with_columns(event_type=ev["event_type"].replace({"add_to_cart": "view", "purchase": "add_to_cart"}))
    model = BehaviorLM(epochs=3, dim=8, n_layers=1, n_heads=1, max_len=16, batch_size=8, progress=False)
    return model.fit(validate_events(ev))


def test_joint_step_probabilities_sum_to_one(tiny):
    enc = tiny.engine.encode(tiny.history_events())
    logp = tiny.engine.joint_step_logp(enc)
    assert logp.shape == (len(enc), 2 * 3)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(len(enc)))


def test_beam_with_all_candidates_equals_brute_force(tiny):
    enc = tiny.engine.encode(Events.trusted(tiny.histories_.filter(tiny.histories_["user_id"] == 0), "user 0"))
    n_steps, n_cand = 3, 6
    beams = decode(tiny.engine, enc, DecodeConfig(n_steps=n_steps, method="beam", beam_width=n_cand**n_steps))
    from behaviorlm.inference.decoding import Trajectory, encode_paths, extend_path

    items, actions, gaps = (x.tolist() for x in enc.sequence(0))
    scores = {}
    for combo in itertools.product(range(n_cand), repeat=n_steps):
        path = Trajectory(items, actions, gaps, [])
        for c in combo:
            lp = tiny.engine.joint_step_logp(encode_paths([path], 16))
            path = extend_path(path, c, 3, float(lp[0, c]))
        scores[combo] = path.logprob
    brute = sorted(scores.values(), reverse=True)
    got = beams.group_by("trajectory", maintain_order=True).agg(pl.col("logprob").first())["logprob"].to_list()
    assert len(got) == n_cand**n_steps
    for a, b in zip(got, brute, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(sum(math.exp(s) for s in brute), 1.0, rel_tol=1e-4)  # all paths: total mass 1


def test_greedy_is_beam_width_one_and_sampling_is_seeded(tiny):
    enc = tiny.engine.encode(tiny.history_events())
    greedy = decode(tiny.engine, enc, DecodeConfig(n_steps=2))
    beam1 = decode(tiny.engine, enc, DecodeConfig(n_steps=2, method="beam", beam_width=1))
    assert greedy["item_id"].to_list() == beam1["item_id"].to_list()
    cfg = DecodeConfig(n_steps=3, method="sample", n_samples=4, temperature=1.2, top_k=4, top_p=0.9, seed=7)
    a, b = decode(tiny.engine, enc, cfg), decode(tiny.engine, enc, cfg)
    assert a.equals(b)
    c = decode(tiny.engine, enc, DecodeConfig(**{**cfg.__dict__, "seed": 8}))
    assert not a.equals(c)
    assert set(a["action"]) <= {"view", "add_to_cart"}
    assert a.columns == ["user_id", "trajectory", "step", "action", "item_id", "step_logprob", "logprob"]
    assert (a["step_logprob"] <= 0).all()
    assert not set(a["item_id"].to_list()) & set(SPECIAL_TOKENS)  # decoded steps are real items, never specials
