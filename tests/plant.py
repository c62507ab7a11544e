"""A simulated plant for the budget controller: a ResNet-20's gates under Adam, without the network.

Each of 9 blocks has an L-gate and its channel gates, with the CIFAR ResNet-20's sequential
costs (a first-stage channel costs four times a last-stage one). A gate's logit is a bias plus,
for dynamic gates, a linear function of a random per-image feature. The task loss resists
closing each gate by its own random importance (fading as a backbone would adapt), gradients
carry noise, and the MAC penalty is ``macs_penalty``'s hard cost with its sigmoid surrogate,
scaled by the controller. The loop follows ``lcsurgery finetune``: Adam at ``auto_gate_lr``,
gate noise fading by ``noise_factor``, gates frozen at ``freeze``. Seeded and single-threaded,
so a run is a deterministic function of its arguments.
"""

from __future__ import annotations

import torch

from lcsurgery.train.budget import BudgetController
from lcsurgery.train.optim import auto_gate_lr
from lcsurgery.train.schedule import noise_factor

PER_CHANNEL = [294912] * 3 + [147456] * 3 + [73728] * 3  # sequential: first-conv filter + next-conv input, per channel
CHANNELS = [16] * 3 + [32] * 3 + [64] * 3
BASE = 300_000  # stem, head, gates


def _straight_through_relu1(z: torch.Tensor, slope: float = 0.05) -> torch.Tensor:
    leaky = torch.where(z < 0, z * slope, torch.where(z > 1, 1 + (z - 1) * slope, z))
    return z.clamp(0, 1) + leaky - leaky.detach()


def _step(z: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    soft = torch.sigmoid(z / temperature)
    return (z > 0).to(z.dtype) + soft - soft.detach()


def simulate(budget: float, steps: int, seed: int = 0, *, static: bool = False, ramp: float = 0.25, batch: int = 64, features: int = 8) -> tuple[float, list[float]]:
    """Train the plant's gates towards ``budget``; returns the final eval MAC fraction and the per-step training fractions."""
    g = torch.Generator().manual_seed(seed)
    freeze = (1 + ramp) / 2
    unit = torch.tensor(PER_CHANNEL, dtype=torch.float64)
    dense = float((unit * torch.tensor(CHANNELS, dtype=torch.float64)).sum()) + BASE
    b_l = torch.ones(len(CHANNELS), dtype=torch.float64, requires_grad=True)
    b_c = [torch.ones(c, dtype=torch.float64, requires_grad=True) for c in CHANNELS]
    w_l = torch.zeros(len(CHANNELS), features, dtype=torch.float64, requires_grad=not static)
    w_c = [torch.zeros(c, features, dtype=torch.float64, requires_grad=not static) for c in CHANNELS]
    importance_l = torch.exp(torch.randn(len(CHANNELS), generator=g, dtype=torch.float64)) * 0.5
    importance_c = [torch.exp(torch.randn(c, generator=g, dtype=torch.float64)) * 0.05 for c in CHANNELS]
    params = [b_l, *b_c] + ([] if static else [w_l, *w_c])
    opt = torch.optim.Adam(params, lr=auto_gate_lr(steps, ramp))
    controller = BudgetController(budget, ramp=ramp)

    def logits(p: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return b_l + p @ w_l.t(), [b + p @ w.t() for b, w in zip(b_c, w_c)]

    def cost(z_l: torch.Tensor, z_c: list[torch.Tensor]) -> torch.Tensor:
        runs = _step(z_l)
        per_image = sum(runs[:, j] * _step(z).sum(1) * unit[j] for j, z in enumerate(z_c))
        return (per_image + BASE) / dense

    fractions = []
    for i in range(steps):
        progress = i / steps
        if progress >= freeze:
            break
        z_l, z_c = logits(torch.randn(batch, features, generator=g, dtype=torch.float64))
        noise = 0.2 * noise_factor(progress, ramp, freeze)
        if noise > 0:
            def noisy(z: torch.Tensor) -> torch.Tensor:
                u = torch.rand(z.shape, generator=g, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
                return z + noise * (u.log() - torch.log1p(-u))

            z_l, z_c = noisy(z_l), [noisy(z) for z in z_c]
        c = cost(z_l, z_c).mean()
        fractions.append(float(c.detach()))
        strength = controller.update(fractions[-1], progress)
        adapt = 1.0 - 0.7 * progress
        task = -adapt * ((_straight_through_relu1(z_l) * importance_l).mean(0).sum() + sum((_straight_through_relu1(z) * v).mean(0).sum() for z, v in zip(z_c, importance_c)))
        opt.zero_grad()
        (task + strength * c).backward()
        for q in params:
            q.grad += 0.01 * torch.randn(q.shape, generator=g, dtype=torch.float64)
        opt.step()
    with torch.no_grad():
        final = float(cost(*logits(torch.randn(2000, features, generator=g, dtype=torch.float64))).mean())
    return final, fractions
