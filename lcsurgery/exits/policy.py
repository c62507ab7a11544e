"""The exit policy: where each image leaves, set for a MAC budget at deployment, without retraining.

``set_budget`` scores held-out images once at every exit, then picks the confidence threshold
(one for all exits, Shallow-Deep Networks' rule) whose mean cost on them meets the budget, or with
``rule="learned"`` first learns, per exit, how likely leaving there is to lose nothing against the
network's own head (Bolukbasi et al.'s exit-or-go-on classifier, on the head's confidence, margin
and entropy) and thresholds that; a head that takes too few of the held-out images (``min_share``) is
switched off, since evaluating it costs every image that passes it more time than it saves;
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
from lcsurgery.exits.model import ExitModel, ExitPolicy, check_cap, exit_features
from lcsurgery.exits.usage import GateDecisions
from lcsurgery.fx.tracer import training_mode
from lcsurgery.macs.dynamic import image_batches
from lcsurgery.surgery.model import LCModel


@dataclasses.dataclass
class ExitScores:
    """What every exit says about a set of images: top softmax probability and class, per image
    [N, exits + 1] (the last column is the network's own head), and the labels when known."""

    confidence: Tensor
    prediction: Tensor
    labels: Tensor | None
    costs: Tensor | None = None  # int64 [N, exits + 1]: each image's MACs leaving at each exit (None: ``exit_costs`` for all)
    features: Tensor | None = None  # [N, exits + 1, 3]: ``exit_features`` of every head (None: the confidence alone)
    heads: list[int] | None = None  # MACs of each exit head, to charge only the heads a policy runs (None: every head runs)
    gates: GateDecisions | None = None  # a gated network's decisions per image with every block run (None: no gates)

    def __len__(self) -> int:
        return len(self.confidence)


def score(model: ExitModel, images: Tensor | Iterable, batch_size: int = 256, progress: bool = True) -> ExitScores:
    """Run every exit on ``images`` (a tensor, or a loader of ``(x, y)`` batches) in eval mode."""
    batches, n = image_batches(images, batch_size, caller="score")
    feats, pred, labels, costs, gates = [], [], [], [], []
    device = next(model.parameters()).device
    gated = isinstance(model.backbone, LCModel)
    with training_mode(model, False), torch.no_grad():
        for x, y in tqdm(batches, total=n, desc="scoring exits", disable=not progress, leave=False):
            outs = model.forward_exits(x.to(device))
            feats.append(torch.stack([exit_features(o) for o in outs], 1).cpu())
            pred.append(torch.stack([o.argmax(1) for o in outs], 1).cpu())
            costs.append(model.last_exit_costs)
            if gated:
                gates.append(GateDecisions.read(model.backbone))
            if y is not None:
                labels.append(y.cpu())
    if not feats:
        raise LCSurgeryError("no images to score the exits on")
    features = torch.cat(feats)
    return ExitScores(features[:, :, 0], torch.cat(pred), torch.cat(labels) if labels else None, torch.cat(costs), features, model.head_macs(), GateDecisions.cat(gates) if gates else None)


def simulate(scores: ExitScores, costs: list[int], policy: ExitPolicy) -> tuple[Tensor, Tensor]:
    """Where each scored image leaves under ``policy`` and the MACs it costs, exactly as
    ``ExitModel`` runs it (``costs`` from ``ExitModel.exit_costs`` with every head; each image's
    own from ``scores.costs`` where the network has gates; the heads ``policy`` switches off are
    neither run nor charged)."""
    n, k = len(scores), scores.confidence.shape[1] - 1
    saved = _saved(scores, policy, k)
    costs = _costs_under(costs, saved)
    check_cap(policy, costs)
    leave = _scores(scores, policy) >= torch.tensor(policy.thresholds)
    forced = policy.forced_exit(costs)
    if forced is not None:
        leave[:, forced:] = True
    leave[:, list(policy.off)] = False
    exit_of = torch.where(leave.any(1), leave.float().argmax(1), torch.full((n,), k))
    own = scores.costs - saved if scores.costs is not None else torch.tensor(costs).expand(n, -1)
    return exit_of, own.gather(1, exit_of[:, None]).squeeze(1)


def _saved(scores: ExitScores, policy: ExitPolicy, k: int) -> Tensor:
    """int64 [exits + 1]: the MACs of the heads ``policy`` switches off, summed up to each exit."""
    if not policy.off:
        return torch.zeros(k + 1, dtype=torch.long)
    if scores.heads is None:
        raise LCSurgeryError("a policy with heads off needs the heads' MACs in the scores: score the images with lcsurgery.exits.policy.score")
    off = torch.tensor([0 if policy.runs(i) else m for i, m in enumerate(scores.heads)] + [0], dtype=torch.long)
    return off.cumsum(0)


def _costs_under(costs: list[int], saved: Tensor) -> list[int]:
    """``ExitModel.exit_costs`` with every head, less the switched-off heads' MACs ``saved`` (``_saved``)."""
    return [c - int(m) for c, m in zip(costs, saved, strict=True)]


def _scores(scores: ExitScores, policy: ExitPolicy) -> Tensor:
    """[N, exits] every early exit's score under ``policy``, as the engine computes it."""
    k = scores.confidence.shape[1] - 1
    if policy.scorer is None:
        return scores.confidence[:, :k]
    if scores.features is None:
        raise LCSurgeryError("a learned policy needs the scores' features: score the images with lcsurgery.exits.policy.score")
    return torch.stack([policy.scores(i, scores.features[:, i]) for i in range(k)], 1)


RULES = ("confidence", "learned")
MIN_SHARE = 0.02  # a head taking fewer of the calibration images than this is switched off


def fit_scorer(scores: ExitScores, steps: int = 200) -> tuple[tuple[float, ...], ...]:
    """Per early exit, a logistic regression on its ``exit_features`` that predicts whether leaving
    there loses nothing against the network's own head (the exit is right, or the head is wrong
    too): Bolukbasi et al.'s exit-or-go-on decision, learned on labelled held-out images."""
    if scores.labels is None or scores.features is None:
        raise LCSurgeryError("learning an exit policy needs labelled images scored by lcsurgery.exits.policy.score")
    k = scores.confidence.shape[1] - 1
    right = scores.prediction == scores.labels[:, None]
    rows = []
    for i in range(k):
        x = scores.features[:, i].double()
        target = (right[:, i] | ~right[:, -1]).double()
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

        def loss() -> Tensor:
            opt.zero_grad()
            value = torch.nn.functional.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], target) + 1e-4 * w[:-1].pow(2).sum()
            value.backward()
            return value

        opt.step(loss)
        rows.append(tuple(float(v) for v in w.detach()))
    return tuple(rows)


def set_budget(
    model: ExitModel,
    mac_fraction: float | None = None,
    *,
    calibration: Tensor | Iterable | ExitScores,
    max_macs: int | None = None,
    rule: str = "confidence",
    min_share: float = MIN_SHARE,
) -> ExitPolicy | None:
    """Set (and return) the policy whose mean MACs on the ``calibration`` images (held-out
    training images, never the test set; or their ``score``) are the largest within
    ``mac_fraction`` of the dense network's, and that never spends more than ``max_macs`` MACs
    per image. ``rule``: threshold each head's confidence (``"confidence"``), or a learned score
    (``"learned"``, fitted on the calibration images, which must then carry labels). Heads that
    take under ``min_share`` of the calibration images are switched off (0: every head runs).
    ``mac_fraction`` None or >= 1 with no cap removes the policy: the dense network."""
    if rule not in RULES:
        raise LCSurgeryError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if mac_fraction is not None and mac_fraction <= 0:
        raise LCSurgeryError(f"mac_fraction must be positive, got {mac_fraction}")
    costs, dense = model.exit_costs(), model.dense_macs()
    if (mac_fraction is None or mac_fraction >= 1) and max_macs is None:
        model.policy = None
        return None
    check_cap(ExitPolicy((0.0,) * model.num_exits, max_macs), costs)
    scores = calibration if isinstance(calibration, ExitScores) else score(model, calibration)
    model.policy = fit_policy(scores, costs, dense, mac_fraction, max_macs, fit_scorer(scores) if rule == "learned" else None, min_share)
    return model.policy


def fit_policy(
    scores: ExitScores, costs: list[int], dense: int, mac_fraction: float | None, max_macs: int | None = None, scorer: tuple | None = None, min_share: float = MIN_SHARE
) -> ExitPolicy:
    """``threshold_policy``, then switch off every head that takes under ``min_share`` of the
    images and fit the threshold again, until none does (or switching off more heads cannot
    meet the budget): a head is small in MACs but not in time at batch 1, and every image that
    passes it pays for it."""
    policy = threshold_policy(scores, costs, dense, mac_fraction, max_macs, scorer)
    k = len(costs) - 1
    while min_share > 0:
        exit_of, _ = simulate(scores, costs, policy)
        shares = torch.bincount(exit_of, minlength=k + 1).double() / len(exit_of)
        forced = policy.forced_exit(_costs_under(costs, _saved(scores, policy, k)))
        weak = {i for i in range(k) if policy.runs(i) and i != forced and shares[i] < min_share}
        if not weak:
            break
        try:
            policy = threshold_policy(scores, costs, dense, mac_fraction, max_macs, scorer, tuple(sorted({*policy.off, *weak})))
        except LCSurgeryError:
            break  # without those heads the budget cannot be met
    return policy


def threshold_policy(
    scores: ExitScores, costs: list[int], dense: int, mac_fraction: float | None, max_macs: int | None = None, scorer: tuple | None = None, off: tuple[int, ...] = ()
) -> ExitPolicy:
    """The shared threshold on the exits' scores (confidence, or ``scorer``'s) whose mean cost on
    ``scores`` is the largest within the budget, with the heads ``off`` not run."""
    k = scores.confidence.shape[1] - 1
    target = float("inf") if mac_fraction is None else mac_fraction * dense

    def mean_cost(t: float) -> float:
        return float(simulate(scores, costs, ExitPolicy((t,) * k, max_macs, scorer, off))[1].double().mean())

    values = _scores(scores, ExitPolicy((0.0,) * k, None, scorer))
    candidates = torch.cat([values.flatten().unique(), torch.tensor([2.0])])  # 2.0: nobody leaves early
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
    return ExitPolicy((float(candidates[lo]),) * k, max_macs, scorer, off)
