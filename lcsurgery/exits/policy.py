"""The exit policy: where each image leaves, set for a MAC budget at deployment, without retraining.

``set_budget`` scores held-out images once at every exit, then picks the confidence threshold
(one for all exits, Shallow-Deep Networks' rule) whose mean cost on them meets the budget;
``max_macs`` caps every image's cost (DDI's halting: an image that would pass the cap leaves at
the last exit within it). ``simulate`` replays a policy on stored scores exactly as
``ExitModel``'s forward would run it, so one scoring pass serves a whole sweep of budgets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lcsurgery.errors import LCSurgeryError
from lcsurgery.exits.model import ExitModel, ExitPolicy, check_cap
from lcsurgery.fx.tracer import training_mode


@dataclasses.dataclass
class ExitScores:
    """What every exit says about a set of images: top softmax probability and class, per image
    [N, exits + 1] (the last column is the network's own head), and the labels when known."""

    confidence: Tensor
    prediction: Tensor
    labels: Tensor | None
    costs: Tensor | None = None  # int64 [N, exits + 1]: each image's MACs leaving at each exit (None: ``exit_costs`` for all)

    def __len__(self) -> int:
        return len(self.confidence)


def score(model: ExitModel, images: Tensor | Iterable, batch_size: int = 256, progress: bool = True) -> ExitScores:
    """Run every exit on ``images`` (a tensor, or a loader of ``(x, y)`` batches) in eval mode."""
    batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size)) if isinstance(images, Tensor) else images
    conf, pred, labels, costs = [], [], [], []
    device = next(model.parameters()).device
    with training_mode(model, False), torch.no_grad():
        for item in tqdm(batches, desc="scoring exits", disable=not progress, leave=False):
            x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
            probs = torch.stack([o.float().softmax(1) for o in model.forward_exits(x.to(device))], 1)
            c, p = probs.max(2)
            costs.append(model.last_exit_costs)
            conf.append(c.cpu())
            pred.append(p.cpu())
            if y is not None:
                labels.append(y.cpu())
    if not conf:
        raise LCSurgeryError("no images to score the exits on")
    return ExitScores(torch.cat(conf), torch.cat(pred), torch.cat(labels) if labels else None, torch.cat(costs))


def simulate(scores: ExitScores, costs: list[int], policy: ExitPolicy) -> tuple[Tensor, Tensor]:
    """Where each scored image leaves under ``policy`` and the MACs it costs, exactly as
    ``ExitModel`` runs it (``costs`` from ``ExitModel.exit_costs``; each image's own from
    ``scores.costs`` where the network has gates)."""
    n, k = len(scores), scores.confidence.shape[1] - 1
    check_cap(policy.max_macs, costs)
    leave = scores.confidence[:, :k] >= torch.tensor(policy.thresholds)
    forced = policy.forced_exit(costs)
    if forced is not None:
        leave[:, forced:] = True
    exit_of = torch.where(leave.any(1), leave.float().argmax(1), torch.full((n,), k))
    own = scores.costs if scores.costs is not None else torch.tensor(costs).expand(n, -1)
    return exit_of, own.gather(1, exit_of[:, None]).squeeze(1)


def set_budget(
    model: ExitModel,
    mac_fraction: float | None = None,
    *,
    calibration: Tensor | Iterable | ExitScores,
    max_macs: int | None = None,
) -> ExitPolicy | None:
    """Set (and return) the policy whose mean MACs on the ``calibration`` images (held-out
    training images, never the test set; or their ``score``) are the largest within
    ``mac_fraction`` of the dense network's, and that never spends more than ``max_macs`` MACs
    per image. ``mac_fraction`` None or >= 1 with no cap removes the policy: the dense network."""
    if mac_fraction is not None and mac_fraction <= 0:
        raise LCSurgeryError(f"mac_fraction must be positive, got {mac_fraction}")
    costs, dense = model.exit_costs(), model.dense_macs()
    if (mac_fraction is None or mac_fraction >= 1) and max_macs is None:
        model.policy = None
        return None
    check_cap(max_macs, costs)
    scores = calibration if isinstance(calibration, ExitScores) else score(model, calibration)
    model.policy = threshold_policy(scores, costs, dense, mac_fraction, max_macs)
    return model.policy


def threshold_policy(scores: ExitScores, costs: list[int], dense: int, mac_fraction: float | None, max_macs: int | None = None) -> ExitPolicy:
    """The shared confidence threshold whose mean cost on ``scores`` is the largest within the budget."""
    k = scores.confidence.shape[1] - 1
    target = float("inf") if mac_fraction is None else mac_fraction * dense

    def mean_cost(t: float) -> float:
        return float(simulate(scores, costs, ExitPolicy((t,) * k, max_macs))[1].double().mean())

    candidates = torch.cat([scores.confidence[:, :k].flatten().unique(), torch.tensor([2.0])])  # 2.0: nobody leaves early
    if mean_cost(float(candidates[0])) > target:
        cheapest = mean_cost(float(candidates[0])) / dense
        raise LCSurgeryError(f"a MAC budget of {mac_fraction} is below what the exits can reach: every image leaving at the first exit costs {cheapest:.3f} of dense")
    lo, hi = 0, len(candidates) - 1  # mean_cost(candidates[lo]) <= target; find the last such
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mean_cost(float(candidates[mid])) <= target:
            lo = mid
        else:
            hi = mid - 1
    return ExitPolicy((float(candidates[lo]),) * k, max_macs)
