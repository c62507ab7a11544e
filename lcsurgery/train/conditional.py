"""Losses that make gates decide per image, not once for every image.

A penalty on the batch-mean MAC cost is met as well by static gates as by per-image ones, and
in short retrofits the gates learn one decision for all images: static pruning with extra
steps. Each loss here adds a per-image signal and leaves *how many* gates are on to the MAC
penalty and its controller, so the budget logic is unchanged:

- ``importance_loss``: per-image targets from the activations themselves (after FTWT, Elkerdawy
  et al. 2022): in each block, the gates that are on in a batch are reassigned to the images and
  channels that carry the most activation mass, and each gate learns, by binary cross-entropy,
  whether it belongs to that set. A channel is kept where it is strong for *this* image; a
  block is kept where its residual is large relative to its shortcut for this image.
- ``batch_shaping_loss``: batch-shaping (Bejnordi et al., ICLR 2020): per gate, the empirical
  CDF of its values over the batch is matched to a Beta prior with the gate's own current mean,
  so a gate spreads its values across images instead of giving all of them the same one.

- ``difficulty_weights``: not a loss but a per-image weight on the MAC penalty, from how hard
  each image is (its rank in the batch by the teacher's, or the network's own, probability of
  the true class): easy images are pushed to close more gates, hard ones are left the MACs they
  need, so the gates learn to spend by difficulty, which a mask for every image cannot.

All read the gate inputs of the latest training forward (as the penalties do) and train the
gates only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.surgery.block import GatedBlock
from lcsurgery.surgery.model import unwrap

KINDS = ("none", "importance", "shaping", "difficulty")


def _latest(block: GatedBlock) -> tuple[Tensor | None, Tensor | None]:
    if block.last is None or block.last.pooled is None:
        raise LCSurgeryError("per-image gate losses need a forward pass in training mode first (they read the latest batch)")
    return block.gate_logits(block.last.pooled)


def batch_top(scores: Tensor, count: int) -> Tensor:
    """bool, shaped like ``scores``: the ``count`` largest entries of the whole tensor."""
    flat = scores.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        keep[flat.topk(min(count, flat.numel())).indices] = True
    return keep.view_as(scores)


def importance_targets(block: GatedBlock) -> tuple[Tensor | None, Tensor | None]:
    """Per-image targets of one block's gates, with as many on as the gates have on now.

    Layer gate: the images with the largest residual ratio (mean |branch| / mean |shortcut|).
    Channel gates: over the batch, the (image, channel) pairs with the largest share of their
    image's channel mass, so an image whose mass sits in few channels is given few.
    """
    z_l, z_c = (None if z is None else z.detach() for z in _latest(block))
    last = block.last
    t_l = t_c = None
    if z_l is not None:
        if last.residual_ratio is None:
            raise LCSurgeryError(f"block {block.name} recorded no residual ratio: run a forward pass in training mode first")
        t_l = batch_top(last.residual_ratio, int((z_l > 0).sum()))
    if z_c is not None:
        if last.channel_mass is None:
            raise LCSurgeryError(f"block {block.name} recorded no channel mass: run a forward pass in training mode first")
        share = last.channel_mass / last.channel_mass.sum(1, keepdim=True).clamp_min(1e-12)
        t_c = batch_top(share, int((z_c > 0).sum()))
    return t_l, t_c


def importance_loss(model: nn.Module, temperature: float = 0.5) -> Tensor:
    """Mean binary cross-entropy of every gate (logit / ``temperature``) against its importance target."""
    terms = []
    for block in unwrap(model).lc_blocks():
        targets = importance_targets(block)
        for z, t in zip(_latest(block), targets):
            if z is not None:
                terms.append(F.binary_cross_entropy_with_logits(z / temperature, t.to(z.dtype), reduction="none").reshape(len(z), -1).mean(1))
    return torch.cat([t.mean(0, keepdim=True) for t in terms]).mean()


def _gate_columns(model: nn.Module) -> Tensor:
    """[B, gates]: every gate logit of the latest batch, one column per gate."""
    cols = []
    for block in unwrap(model).lc_blocks():
        for z in _latest(block):
            if z is not None:
                cols.append(z if z.dim() == 2 else z[:, None])
    return torch.cat(cols, 1)


def batch_shaping_loss(model: nn.Module, concentration: float = 1.0, temperature: float = 0.5) -> Tensor:
    """``batch_shaping`` of every gate's values sigmoid(logit / ``temperature``) over the latest batch."""
    return batch_shaping(torch.sigmoid(_gate_columns(model) / temperature).t(), concentration)


def batch_shaping(values: Tensor, concentration: float = 1.0, floor: float = 0.05) -> Tensor:
    """Batch-shaping of ``values`` [gates, batch] in (0, 1): per gate, (1/N) sum_i (i/(N+1) - F(x_(i)))^2
    over its sorted values, F the Beta CDF with the gate's own current mean (clamped to
    [``floor``, 1 - ``floor``]) and a + b = ``concentration`` (1: U-shaped, decisive gates); the
    mean over gates."""
    x, _ = values.clamp(1e-4, 1 - 1e-4).sort(1)
    mean = x.detach().mean(1, keepdim=True).clamp(floor, 1 - floor)
    a, b = mean * concentration, (1 - mean) * concentration
    n = x.shape[1]
    ecdf = torch.arange(1, n + 1, device=x.device, dtype=x.dtype) / (n + 1)
    return (ecdf - _BetaCdf.apply(x, a, b)).pow(2).mean()


class _BetaCdf(torch.autograd.Function):
    """Regularised incomplete beta I_x(a, b), differentiable in x (its derivative is the Beta pdf)."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor) -> Tensor:  # noqa: ANN001 - autograd signature
        x64, a64, b64 = x.double(), a.double().expand_as(x), b.double().expand_as(x)
        ctx.save_for_backward(x64, a64, b64)
        return beta_cdf(x64, a64, b64).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        x, a, b = ctx.saved_tensors
        log_pdf = (a - 1) * x.log() + (b - 1) * torch.log1p(-x) - _log_beta(a, b)
        return grad * log_pdf.exp().to(grad.dtype), None, None


def _log_beta(a: Tensor, b: Tensor) -> Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def beta_cdf(x: Tensor, a: Tensor, b: Tensor, iterations: int = 200) -> Tensor:
    """I_x(a, b) by its continued fraction (Numerical Recipes' betacf), elementwise, float64."""
    front = torch.exp(a * x.log() + b * torch.log1p(-x) - _log_beta(a, b))
    direct = x < (a + 1) / (a + b + 2)  # where the fraction converges fast; elsewhere use I_x(a,b) = 1 - I_{1-x}(b,a)
    aa, bb, xx = torch.where(direct, a, b), torch.where(direct, b, a), torch.where(direct, x, 1 - x)
    value = front * _beta_fraction(aa, bb, xx, iterations) / aa
    return torch.where(direct, value, 1 - value)


def _beta_fraction(a: Tensor, b: Tensor, x: Tensor, iterations: int) -> Tensor:
    tiny = 1e-300

    def fix(t: Tensor) -> Tensor:
        return torch.where(t.abs() < tiny, torch.full_like(t, tiny), t)

    c = torch.ones_like(x)
    d = 1 / fix(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, iterations + 1):
        m2 = 2 * m
        num = m * (b - m) * x / ((a - 1 + m2) * (a + m2))
        d = 1 / fix(1 + num * d)
        c = fix(1 + num / c)
        h = h * d * c
        num = -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1 + m2))
        d = 1 / fix(1 + num * d)
        c = fix(1 + num / c)
        delta = d * c
        h = h * delta
        if bool((delta - 1).abs().max() < 1e-12):
            break
    return h


def difficulty_weights(logits: Tensor, targets: Tensor, spread: float = 1.0) -> Tensor:
    """[B] weights of mean 1 for each image's MAC penalty: 1 + ``spread`` for the batch's easiest
    image (highest probability of its true class under ``logits``), 1 - ``spread`` for its
    hardest, linear in the rank between. Ranks, not probabilities: a trained network is sure of
    most training images, and the weights must still tell them apart."""
    if not 0.0 < spread <= 1.0:
        raise LCSurgeryError(f"the difficulty weights' spread must be in (0, 1], got {spread}")
    n = len(targets)
    if n < 2:
        return torch.ones(n, device=logits.device)
    sure = logits.detach().float().log_softmax(1).gather(1, targets[:, None]).squeeze(1)
    rank = torch.empty(n, device=logits.device)
    rank[sure.argsort()] = torch.arange(n, device=logits.device, dtype=rank.dtype)
    return 1.0 + spread * (2.0 * rank / (n - 1) - 1.0)


def conditional_loss(model: nn.Module, kind: str) -> Tensor | None:
    """The per-image gate loss named by ``kind`` (one of ``KINDS``), or None for ``"none"`` and
    ``"difficulty"`` (which weights the MAC penalty instead: ``difficulty_weights``)."""
    if kind in ("none", "difficulty"):
        return None
    if kind == "importance":
        return importance_loss(model)
    if kind == "shaping":
        return batch_shaping_loss(model)
    raise LCSurgeryError(f"unknown per-image gate loss {kind!r}: choose from {', '.join(KINDS)}")
