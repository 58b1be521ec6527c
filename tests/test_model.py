"""Properties of the transformer itself: causality, padding invariance, persistence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from behaviorlm.nn.model import BehaviorTransformer, ModelConfig
from behaviorlm.nn.training import FusedLinearCrossEntropy, TrainConfig, sequence_loss
from behaviorlm.sequence.tokenizer import PAD


def _model(**kw) -> BehaviorTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=30, n_actions=7, n_gaps=10, max_len=16, dim=16, n_layers=2, n_heads=2, **kw)
    return BehaviorTransformer(cfg).eval()


#: every block variant the leakage and equivalence properties must hold for
ARCHS = [
    pytest.param({}, id="learned-gelu"),
    pytest.param({"positions": "rope"}, id="rope"),
    pytest.param({"ffn": "swiglu"}, id="swiglu"),
    pytest.param({"positions": "rope", "ffn": "swiglu", "copy_head": True}, id="rope-swiglu-copy"),
]


def _batch(b=3, n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(4, 30, (b, n), generator=g),
        torch.randint(4, 7, (b, n), generator=g),
        torch.randint(1, 10, (b, n), generator=g),
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_causality_later_events_do_not_change_earlier_logits(arch):
    m = _model(**arch)
    items, actions, gaps = _batch()
    h = m(items, actions, gaps)
    items2, actions2 = items.clone(), actions.clone()
    items2[:, 6:] = (items2[:, 6:] + 5) % 26 + 4
    actions2[:, 6:] = 4
    h2 = m(items2, actions2, gaps)
    torch.testing.assert_close(h[:, :6], h2[:, :6])
    assert not torch.allclose(h[:, 6:], h2[:, 6:])


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_does_not_change_logits_or_loss(arch):
    m = _model(**arch)
    items, actions, gaps = _batch(b=2, n=8)
    tgt_i, tgt_a = torch.roll(items, -1, 1), torch.roll(actions, -1, 1)
    tgt_i[:, -1] = PAD
    tgt_a[:, -1] = PAD
    pad = lambda t: torch.cat([t, torch.full((t.shape[0], 5), PAD)], 1)  # noqa: E731
    short = dict(items=items, actions=actions, gaps=gaps, target_items=tgt_i, target_actions=tgt_a)
    long = {k: pad(v) for k, v in short.items()}
    cfg = TrainConfig()
    loss_s, n_s = sequence_loss(m, short, cfg)
    loss_l, n_l = sequence_loss(m, long, cfg)
    assert n_s == n_l
    torch.testing.assert_close(loss_s, loss_l)
    torch.testing.assert_close(m(items, actions, gaps), m(*(long[k] for k in ("items", "actions", "gaps")))[:, :8])


def test_fused_cross_entropy_matches_torch():
    torch.manual_seed(0)
    h = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    e = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(4, 20, (50,))
    ref_logits = h @ e.T
    ref_logits = torch.cat([torch.full_like(ref_logits[:, :4], float("-inf")), ref_logits[:, 4:]], 1)
    ref = F.cross_entropy(ref_logits, t)
    ref.backward()
    gh, ge = h.grad.clone(), e.grad.clone()
    h.grad = e.grad = None
    got = FusedLinearCrossEntropy.apply(h, e, t, 7)  # chunk smaller than rows
    got.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(e.grad, ge)
    assert torch.autograd.gradcheck(lambda a, b: FusedLinearCrossEntropy.apply(a, b, t, 16), (h, e))


def test_item_head_is_tied_and_specials_never_predicted():
    m = _model()
    items, actions, gaps = _batch()
    h = m(items, actions, gaps)
    logits = m.item_logits(h, actions)
    assert torch.isinf(logits[..., :4]).all()
    # tied: the output layer is the input item embedding itself, so editing one row of it moves
    # exactly that item's logit and no other parameter holds an item-sized output matrix
    q = m.item_query(h, actions)
    torch.testing.assert_close(logits[..., 4:], (q @ m.item_emb.weight.T)[..., 4:])
    with torch.no_grad():
        m.item_emb.weight[10] += 1.0
    moved = m.item_logits(h, actions)
    assert not torch.allclose(moved[..., 10], logits[..., 10])
    torch.testing.assert_close(moved[..., 11:], logits[..., 11:])
    n_items = m.config.n_items
    assert [n for n, p in m.named_parameters() if n_items in p.shape] == ["item_emb.weight"]


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch):
    m = _model(**arch)
    m.save(tmp_path)
    back = BehaviorTransformer.load(tmp_path)
    assert back.config == m.config
    items, actions, gaps = _batch()
    torch.testing.assert_close(m(items, actions, gaps), back(items, actions, gaps))


def test_config_validation():
    import pytest

    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(10, 5, 5, dim=10, n_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(10, 5, 5, dropout=1.5)
    with pytest.raises(ValueError, match="exceeds max_len"):
        _model()(*_batch(n=20))


@pytest.mark.parametrize("arch", ARCHS)
def test_last_position_forward_equals_full_forward(arch):
    m = _model(**arch)
    items, actions, gaps = _batch(b=4, n=12)
    last = torch.tensor([11, 3, 0, 7])
    items[1, 4:] = PAD  # right padding after each row's last position
    full = m(items, actions, gaps)[torch.arange(4), last]
    torch.testing.assert_close(m.hidden(m(items, actions, gaps, last=last)), full)


# ----------------------------------------------------------------------------- request time
def test_a_request_time_model_reads_only_the_next_events_time_and_nothing_later():
    """Position t sees the gap bucket of token t + 1 (its target's time) and nothing else of it:
    changing token t + 1's item, action or packed value leaves h_t alone; changing its time
    does not. The last position reads the request's bucket instead."""
    m = _model(time_context="request", value_sizes=(3,))
    items, actions, gaps = _batch()
    h = m(items, actions, gaps)
    items2, actions2, gaps2 = items.clone(), actions.clone(), gaps.clone()
    items2[:, 6:] = (items2[:, 6:] + 5) % 26 + 4
    actions2[:, 6:] = 4
    gaps2[:, 6:] += 10 * 2  # a value packed above the gap id: the request part drops it
    torch.testing.assert_close(m(items2, actions2, gaps2)[:, :6], h[:, :6])
    later = gaps.clone()
    later[:, 6] = torch.where(later[:, 6] == 9, 2, 9)
    moved = m(items, actions, later)
    torch.testing.assert_close(moved[:, :5], h[:, :5])
    assert not torch.allclose(moved[:, 5], h[:, 5])  # the time of event 6 is position 5's request time


def test_a_request_time_model_scored_at_last_uses_the_request_and_equals_the_full_pass():
    m = _model(time_context="request")
    items, actions, gaps = _batch()
    last = torch.tensor([8, 4, 7])
    request = gaps[torch.arange(3), last + 1]  # the request at the next event's time ...
    full = m(items, actions, gaps)
    at_last = m(items, actions, gaps, last=last, request=request)
    torch.testing.assert_close(at_last, full[torch.arange(3), last], atol=1e-5, rtol=1e-5)  # ... is training's view
    other = m(items, actions, gaps, last=last, request=torch.where(request == 9, 2, 9))
    assert not torch.allclose(other, at_last)


def test_a_request_time_model_refuses_to_score_without_a_request_time():
    import pytest

    from behaviorlm.errors import ConfigurationError

    m = _model(time_context="request")
    items, actions, gaps = _batch()
    with pytest.raises(ConfigurationError, match="trained with time_context='request'.*--as-of"):
        m(items, actions, gaps, last=torch.tensor([9, 4, 7]))
    with pytest.raises(ConfigurationError, match="time_context must be one of"):
        _model(time_context="tomorrow")


def test_a_gap_head_cannot_read_the_request_time_it_would_predict():
    import pytest

    from behaviorlm.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="gap_head and time_context='request' cannot be combined"):
        _model(time_context="request", gap_head=True)


def test_rope_attention_depends_on_distance_not_on_the_window_offset():
    """Rotary positions: shifting a whole (fully causal) sequence right by a pad-free prefix that
    is then masked out is not possible, so the property is checked on the rotation itself --
    q_s . k_t is a function of s - t."""
    from behaviorlm.nn.model import Rotary

    rot = Rotary(8, 32)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    seq = lambda x: x.expand(1, 1, 32, 8)  # noqa: E731  # the same vector at every position
    scores = rot(seq(q)) @ rot(seq(k)).transpose(-1, -2)  # (1, 1, 32, 32)
    torch.testing.assert_close(scores[0, 0, 5, 2], scores[0, 0, 20, 17])
    torch.testing.assert_close(scores[0, 0, 9, 9], scores[0, 0, 0, 0])
    assert not torch.allclose(scores[0, 0, 5, 2], scores[0, 0, 5, 4])
    last = torch.tensor([20])
    torch.testing.assert_close(rot(q, last), rot(seq(q))[:, :, 20:21])


def test_architecture_options_are_validated_and_swiglu_keeps_the_adapter_targets():
    from behaviorlm.nn.lora import TARGETS

    with pytest.raises(ValueError, match="positions"):
        ModelConfig(10, 5, 5, positions="alibi")
    with pytest.raises(ValueError, match="ffn"):
        ModelConfig(10, 5, 5, ffn="relu")
    with pytest.raises(ValueError, match="even head width"):
        ModelConfig(10, 5, 5, dim=6, n_heads=2, positions="rope")
    m = _model(ffn="swiglu", positions="rope")
    names = {n for n, _ in m.named_modules()}
    assert all(f"blocks.0.{t}" in names for t in TARGETS)
    assert m.pos_emb is None and m.blocks[0].mlp[0].out_features == 2 * m.blocks[0].mlp[2].in_features
