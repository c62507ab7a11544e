"""Per-image gate losses: importance targets, batch-shaping and rate bounds (lcsurgery.train.conditional)."""

from __future__ import annotations

import pytest
import torch
from zoo import example, original, randomize_gates

import lcsurgery
from lcsurgery.train.conditional import _BetaCdf, batch_shaping, batch_shaping_loss, batch_top, beta_cdf, conditional_loss, difficulty_weights, importance_loss, importance_targets
from lcsurgery.train.regularize import macs_penalty


def _forward(seed: int = 0) -> lcsurgery.LCModel:
    lc = lcsurgery.convert(original("cifar.resnet20"), "sequential").train()
    randomize_gates(lc, seed=seed)
    lc(example("cifar.resnet20", batch=16, seed=seed))
    return lc


def test_batch_top_keeps_the_largest_entries_of_the_whole_batch():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.7]])
    assert batch_top(scores, 3).tolist() == [[False, True, False], [True, False, True]]
    assert not batch_top(scores, 0).any() and batch_top(scores, 99).all()


def test_importance_targets_keep_as_many_gates_on_and_follow_the_activations():
    lc = _forward()
    for b in lcsurgery.gated_blocks(lc):
        z_l, z_c = (z.detach() for z in b.gate_logits(b.last.pooled))
        t_l, t_c = importance_targets(b)
        assert int(t_l.sum()) == int((z_l > 0).sum()) and int(t_c.sum()) == int((z_c > 0).sum())
        if 0 < int(t_l.sum()) < len(t_l):  # the kept images are those with the largest residual ratio
            assert b.last.residual_ratio[t_l].min() >= b.last.residual_ratio[~t_l].max()
        share = b.last.channel_mass / b.last.channel_mass.sum(1, keepdim=True)
        if 0 < int(t_c.sum()) < t_c.numel():
            assert share[t_c].min() >= share[~t_c].max()


def test_block_records_what_the_targets_read():
    lc = _forward()
    b = lcsurgery.gated_blocks(lc)[0]
    assert b.last.channel_mass.shape == (16, b.gated_channels) and (b.last.channel_mass >= 0).all()
    assert b.last.residual_ratio.shape == (16,) and not b.last.channel_mass.requires_grad
    with torch.no_grad():
        lc.eval()(example("cifar.resnet20", batch=2))
    assert b.last.channel_mass is None  # eval records nothing extra


def test_losses_train_the_gates_only():
    for kind in ("importance", "shaping"):
        lc = _forward(seed=2)
        lc.zero_grad()
        conditional_loss(lc, kind).backward()
        grads = {n: p.grad for n, p in lc.named_parameters()}
        assert all(g is None or not g.any() for n, g in grads.items() if not n.startswith("lc_gates.")), kind
        assert any(g is not None and g.any() for n, g in grads.items() if n.startswith("lc_gates.")), kind
    assert conditional_loss(lc, "none") is None
    with pytest.raises(lcsurgery.LCSurgeryError, match="unknown per-image gate loss 'soft'"):
        conditional_loss(lc, "soft")


def test_weights_from_targets_keeps_task_gradients_off_the_gate_weights():
    lc = lcsurgery.convert(original("cifar.resnet20"), "sequential").train()
    randomize_gates(lc, seed=0)
    for b in lcsurgery.gated_blocks(lc):
        b.weights_from_targets = True
        with torch.no_grad():
            b.l_net.bias.fill_(5.0)  # every block runs, so its channel gates get a task gradient
    out = lc(example("cifar.resnet20", batch=8))
    out.square().mean().backward()
    b = lcsurgery.gated_blocks(lc)[4]
    assert b.c_net.weight.grad is None and b.c_net.bias.grad is not None and b.c_net.bias.grad.any()
    lc.zero_grad()
    importance_loss(lc).backward()
    assert b.c_net.weight.grad is not None and b.c_net.weight.grad.any()


def test_beta_cdf_matches_closed_forms_and_its_gradient_is_the_pdf():
    x = torch.linspace(0.01, 0.99, 37, dtype=torch.float64)
    one = torch.ones_like(x)
    assert torch.allclose(beta_cdf(x, one, one), x, atol=1e-10)  # Beta(1, 1): uniform
    assert torch.allclose(beta_cdf(x, 2.5 * one, one), x**2.5, atol=1e-10)  # Beta(a, 1): x^a
    assert torch.allclose(beta_cdf(x, one, 0.3 * one), 1 - (1 - x) ** 0.3, atol=1e-10)  # Beta(1, b): 1 - (1 - x)^b
    a, b = torch.full_like(x, 0.6), torch.full_like(x, 0.4)
    assert torch.allclose(beta_cdf(x, a, b) + beta_cdf(1 - x, b, a), one, atol=1e-10)  # symmetry
    xs = x.clone().requires_grad_(True)
    _BetaCdf.apply(xs, a, b).sum().backward()
    pdf = x ** (a - 1) * (1 - x) ** (b - 1) / torch.exp(torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b))
    assert torch.allclose(xs.grad, pdf, rtol=1e-8)


def test_batch_shaping_is_zero_at_the_prior_and_penalises_one_value_for_all():
    """Gate values spread as the prior's quantiles (Beta(0.5, 0.5) for a mean of 0.5 and
    concentration 1: F^-1(p) = sin^2(pi p / 2)) cost nothing; one value for all images costs ~1/12."""
    n = 63
    p = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
    quantiles = torch.sin(torch.pi * p / 2) ** 2
    assert float(batch_shaping(quantiles[None], concentration=1.0)) == pytest.approx(0.0, abs=1e-12)
    same = batch_shaping(torch.full((1, n), 0.5, dtype=torch.float64), concentration=1.0)
    assert float(same) == pytest.approx(float(((p - 0.5) ** 2).mean()), rel=1e-6)
    values = torch.full((3, n), 0.5, dtype=torch.float64, requires_grad=True)
    batch_shaping(values).backward()
    assert values.grad.abs().sum() > 0  # a pull away from one shared value


def test_batch_shaping_loss_reads_every_gate_of_the_latest_batch():
    lc = _forward()
    value = batch_shaping_loss(lc)
    assert 0 < float(value) < 1 / 3


def test_difficulty_weights_rank_images_by_their_true_class_probability():
    logits = torch.tensor([[4.0, 0.0], [0.0, 1.0], [0.0, 3.0], [2.0, 2.0], [0.0, 9.0]])
    y = torch.tensor([0, 1, 0, 0, 1])
    w = difficulty_weights(logits, y)  # p(true): 0.98, 0.73, 0.05, 0.5, ~1.0
    assert torch.allclose(w, torch.tensor([1.5, 1.0, 0.0, 0.5, 2.0]))
    half = difficulty_weights(logits, y, spread=0.5)
    assert float(half.mean()) == pytest.approx(1.0) and float(half.min()) == pytest.approx(0.5) and float(half.max()) == pytest.approx(1.5)
    assert torch.equal(difficulty_weights(logits[:1], y[:1]), torch.ones(1))
    with pytest.raises(lcsurgery.LCSurgeryError, match=r"spread must be in \(0, 1\]"):
        difficulty_weights(logits, y, spread=1.5)


def test_difficulty_weighted_penalty_is_the_weighted_hard_cost_and_pushes_each_image_by_its_weight():
    lc = _forward(seed=2)
    dense = lcsurgery.static_costs(lc, (3, 32, 32)).dense
    per_image = lcsurgery.last_macs(lc, "sequential").double() / dense
    w = torch.linspace(0.0, 2.0, len(per_image))
    assert float(macs_penalty(lc, image_weights=w)) == pytest.approx(float((per_image * w).mean()), rel=1e-6)
    # an image of weight 0 is not pushed at all: the gates' gradient is the sum of the others'
    lc.zero_grad()
    macs_penalty(lc, image_weights=torch.zeros(len(per_image))).backward()
    assert all(p.grad is None or not p.grad.any() for p in lc.lc_gates.parameters())
    one_hot = torch.zeros(len(per_image))
    grads = []
    for i in (0, 1):
        one_hot.zero_()
        one_hot[i] = 1.0
        lc.zero_grad()
        macs_penalty(lc, image_weights=one_hot).backward()
        grads.append(torch.cat([p.grad.flatten() for p in lc.lc_gates.parameters() if p.grad is not None]).clone())
    lc.zero_grad()
    macs_penalty(lc, image_weights=torch.tensor([1.0, 1.0] + [0.0] * (len(per_image) - 2))).backward()
    both = torch.cat([p.grad.flatten() for p in lc.lc_gates.parameters() if p.grad is not None])
    assert torch.allclose(both, grads[0] + grads[1], atol=1e-6)


def test_difficulty_needs_the_macs_penalty_and_a_spread_in_range():
    from lcsurgery.train.config import FinetuneConfig

    with pytest.raises(lcsurgery.LCSurgeryError, match="needs --penalty macs"):
        FinetuneConfig(model="cifar:resnet20", per_image_loss="difficulty", penalty="l1")
    with pytest.raises(lcsurgery.LCSurgeryError, match=r"a weight in \(0, 1\]"):
        FinetuneConfig(model="cifar:resnet20", per_image_loss="difficulty", per_image_weight=2.0)
    with pytest.raises(lcsurgery.LCSurgeryError, match="--static gates read no input"):
        FinetuneConfig(model="cifar:resnet20", per_image_loss="difficulty", static=True)
    assert conditional_loss(_forward(), "difficulty") is None
