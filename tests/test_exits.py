"""Early exits: exact at init over the zoo, MACs equal to fvcore on truncated networks, the engine
equal to the policy replayed on every exit's scores, the cap, the budget search, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from zoo import ZOO, ZOO_BY_NAME, example, original, randomize_gates

import lcsurgery
from lcsurgery.errors import LCSurgeryError
from lcsurgery.exits.heads import ExitHead
from lcsurgery.exits.model import ExitPolicy, add_exits, exit_features, exit_points
from lcsurgery.exits.policy import ExitScores, fit_policy, fit_scorer, score, set_budget, simulate, threshold_policy
from lcsurgery.macs.static import fvcore_macs, static_costs
from lcsurgery.models.cifar_resnet import resnet20

NAMES = [z.name for z in ZOO]


def _exits(name: str, gated: str | None = None, **kw):
    """Exits on the zoo model, or (``gated``: a placement) on it converted, with random per-image gates."""
    size = ZOO_BY_NAME[name].size
    model = original(name)
    if gated:
        model = lcsurgery.convert(model, placement=gated, input_size=(3, size, size)).eval()
        randomize_gates(model, seed=3)
    return add_exits(model, input_size=(3, size, size), **kw)


@pytest.mark.parametrize("name", NAMES)
def test_exits_leave_the_output_unchanged_and_sit_where_asked(name):
    e = _exits(name).eval()
    x = example(name)
    with torch.no_grad():
        assert torch.equal(e(x), original(name)(x))
    fractions = [p.fraction for p in e.points]
    assert 1 <= e.num_exits <= 6 and fractions == sorted(fractions) and all(0 < f < 0.99 for f in fractions)
    assert e.last_exit.tolist() == [e.num_exits] * len(x) and e.last_macs.tolist() == [e.dense_macs()] * len(x)


def _stem_and_blocks(m: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    stem = [m.conv1, m.bn1, nn.ReLU()] + ([m.maxpool] if hasattr(m, "maxpool") else [])
    stages = [m.layer1, m.layer2, m.layer3] + ([m.layer4] if hasattr(m, "layer4") else [])
    return stem, [b for s in stages for b in s]


@pytest.mark.parametrize(
    ("factory", "size", "at", "blocks", "hidden"),
    [(resnet20, 32, ["layer1.0", "layer2", "layer3.1"], [1, 6, 8], 0), (torchvision.models.resnet18, 64, ["layer1", "layer2", "layer3"], [2, 4, 6], 32)],
)
def test_exit_costs_equal_fvcore_on_the_truncated_network(factory, size, at, blocks, hidden):
    torch.manual_seed(0)
    model = factory().eval()
    e = add_exits(model, at, input_size=(3, size, size), hidden=hidden)
    assert [p.name for p in e.points] == at
    x = torch.zeros(1, 3, size, size)
    stem, all_blocks = _stem_and_blocks(model)
    heads = []
    for i, n in enumerate(blocks):
        truncated = nn.Sequential(*stem, *all_blocks[:n])  # the network physically cut after the exit's block
        heads.append(fvcore_macs(e.heads[i], (truncated(x),)))
        assert e.exit_costs()[i] == fvcore_macs(truncated, (x,)) + sum(heads)
    assert e.dense_macs() == fvcore_macs(model, (x,))
    assert e.exit_costs()[-1] == e.dense_macs() + sum(heads)


def _randomize_heads(e, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for h in e.heads:
            h.fc.weight.copy_(torch.randn(h.fc.weight.shape, generator=g) / h.fc.in_features)  # confident, not saturated


def _scored(name: str, gated: str | None):
    """Exits with random confident heads on the zoo model, 16 example images and every exit's scores on them."""
    e = _exits(name, gated).eval()
    _randomize_heads(e)
    x = example(name, batch=16, seed=1)
    return e, x, score(e, x, progress=False)


def _between(values: torch.Tensor, share: float) -> float:
    """A threshold between two of ``values`` (no ties) with about ``share`` of them below it."""
    ordered = values.flatten().sort().values
    q = int(share * len(ordered))
    return (float(ordered[q]) + float(ordered[q + 1])) / 2


def _assert_batch_one_matches(e, x, exit_of, macs) -> None:
    """Image by image at batch 1, the same exits and costs (with gates, counted when last_macs is read)."""
    with torch.no_grad():
        for n in range(len(x)):
            e(x[n : n + 1])
            assert (int(e.last_exit[0]), int(e.last_macs[0])) == (int(exit_of[n]), int(macs[n])), n


@pytest.mark.parametrize(("name", "gated"), [("cifar.resnet20", None), ("tv.resnet18", None), ("tv.mobilenet_v2", None), ("cifar.resnet20", "sequential"), ("tv.resnet18", "parallel")])
def test_engine_runs_the_policy_as_replayed_on_every_exits_scores(name, gated):
    e, x, scores = _scored(name, gated)
    with torch.no_grad():
        every = e.forward_exits(x)
    e.policy = ExitPolicy((_between(scores.confidence[:, :-1], 0.93),) * e.num_exits)
    with torch.no_grad():
        out = e(x)
    exit_of, macs = simulate(scores, e.exit_costs(), e.policy)
    assert torch.equal(e.last_exit, exit_of) and torch.equal(e.last_macs, macs)
    assert 0 < int((exit_of < e.num_exits).sum()) < len(x), "the test needs images leaving early and going on"
    expected = torch.stack([every[i][n] for n, i in enumerate(exit_of.tolist())])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    _assert_batch_one_matches(e, x, exit_of, macs)


@pytest.mark.parametrize("gated", [None, "sequential"])
def test_engine_runs_a_learned_policy_as_replayed(gated):
    e, x, scores = _scored("cifar.resnet20", gated)
    # a learned policy, fitted on labelled scores (exit 0 right on odd images, the network's head on even ones), run by the engine as replayed
    scores.labels = torch.where(torch.arange(len(x)) % 2 == 1, scores.prediction[:, 0], scores.prediction[:, -1])
    scorer = fit_scorer(scores)
    first = ExitPolicy((0.0,) * e.num_exits, None, scorer).scores(0, scores.features[:, 0]).sort().values
    e.policy = ExitPolicy(((float(first[7]) + float(first[8])) / 2,) * e.num_exits, None, scorer)  # half leave at the first exit
    with torch.no_grad():
        e(x)
    exit_of, macs = simulate(scores, e.exit_costs(), e.policy)
    assert torch.equal(e.last_exit, exit_of) and torch.equal(e.last_macs, macs) and int((exit_of == 0).sum()) == 8



@pytest.mark.parametrize("gated", [None, "sequential"])
def test_heads_switched_off_are_neither_run_nor_charged(gated):
    e, x, scores = _scored("cifar.resnet20", gated)
    calls = [0] * e.num_exits
    for i, head in enumerate(e.heads):
        head.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    e.policy = ExitPolicy((_between(scores.confidence[:, 1:-1], 0.9),) * e.num_exits, off=(0, 2))
    with torch.no_grad():
        e(x)
    exit_of, macs = simulate(scores, e.exit_costs(), e.policy)
    assert torch.equal(e.last_exit, exit_of) and torch.equal(e.last_macs, macs)
    assert calls[0] == calls[2] == 0 and calls[1] == 1 and not set(exit_of.tolist()) & {0, 2}
    assert 0 < int((exit_of < e.num_exits).sum()) < len(x), "the test needs images leaving early and going on"
    heads = e.head_macs()
    off = e.exit_costs(off=(0, 2))
    assert off == [c - heads[0] - (heads[2] if i >= 2 else 0) for i, c in enumerate(e.exit_costs())]
    if gated is None:  # every image pays the segments it ran and the heads that ran
        assert macs.tolist() == [off[i] for i in exit_of.tolist()]
    _assert_batch_one_matches(e, x, exit_of, macs)
    assert calls[0] == calls[2] == 0


def test_the_cap_forces_images_out_at_the_last_head_that_runs_within_it():
    e = add_exits(resnet20().eval())
    _randomize_heads(e)
    costs = e.exit_costs(off=(2,))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    e.policy = ExitPolicy((1.1,) * e.num_exits, max_macs=costs[2] + 1, off=(2,))  # exit 2 would fit the cap, but its head is off
    with torch.no_grad():
        e(x)
    assert e.last_exit.tolist() == [1] * len(x) and e.last_macs.tolist() == [costs[1]] * len(x)
    e.policy = ExitPolicy((1.1,) * e.num_exits, off=(e.num_exits,))
    with pytest.raises(LCSurgeryError, match=rf"the policy has {e.num_exits} thresholds and heads off at \[{e.num_exits}\], the model {e.num_exits} exits"):
        e(x)


def test_fit_policy_switches_off_the_heads_that_take_too_few_images():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(1000, 5, generator=g)
    conf[:, 0] *= 0.7  # the first head is rarely confident
    scores = ExitScores(conf, torch.zeros(1000, 5, dtype=torch.long), None, heads=[2, 2, 2, 2])
    costs, dense = [10, 25, 45, 70, 101], 100
    every = fit_policy(scores, costs, dense, 0.6, min_share=0.0)
    exit_of, _ = simulate(scores, costs, every)
    assert every.off == () and 0 < float((exit_of == 0).double().mean()) < 0.05
    fewer = fit_policy(scores, costs, dense, 0.6, min_share=0.05)
    exit_of, macs = simulate(scores, costs, fewer)
    shares = torch.bincount(exit_of, minlength=5).double() / len(exit_of)
    assert fewer.off == (0,) and float(macs.double().mean()) <= 60 and bool((shares[1:4] >= 0.05).all())
    assert all(m == costs[i] - 2 for m, i in zip(macs.tolist(), exit_of.tolist(), strict=True))  # the first head is not charged


@pytest.mark.parametrize(("size", "hidden"), [(32, 0), (8, 0), (7, 0), (14, 32)])
def test_a_head_computes_sdns_mix_of_adaptive_max_and_average_pooling(size, hidden):
    torch.manual_seed(0)
    head = ExitHead(16, 10, pool=4, hidden=hidden)
    with torch.no_grad():
        head.mix.fill_(0.7)
    x = torch.randn(3, 16, size, size)
    w = torch.sigmoid(torch.tensor(0.7))
    pooled = ((1 - w) * F.adaptive_avg_pool2d(x, 4) + w * F.adaptive_max_pool2d(x, 4)).flatten(1)
    expected = head.fc(head.hidden(pooled) if hidden else pooled)
    torch.testing.assert_close(head(x), expected, rtol=1e-6, atol=1e-6)
    assert (fvcore_macs(head, (x[:1],))) == 16 * 16 * (hidden or 10) + hidden * 10


def test_a_policy_scores_logits_as_it_scores_their_exit_features():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    features = exit_features(logits)
    confidence = ExitPolicy((0.5,) * 2)
    learned = ExitPolicy((0.5,) * 2, None, ((1.0, -2.0, 0.5, 0.3), (0.2, 0.1, -1.0, 0.0)))
    for policy in (confidence, learned):
        for i in range(2):
            assert torch.equal(policy.score_logits(i, logits), policy.scores(i, features))
    for n in range(64):  # batch 1, as the engine's one-image path scores it
        assert torch.equal(confidence.score_logits(0, logits[n : n + 1]), features[n : n + 1, 0])

# Each architecture family once, placements alternating; the CIFAR ResNet-20 under both.
GATED = [
    ("cifar.resnet20", "parallel"), ("cifar.resnet20", "sequential"), ("tv.resnet50", "sequential"), ("tv.mobilenet_v2", "parallel"),
    ("tv.convnext_tiny", "sequential"), ("timm.seresnext26d_32x4d", "parallel"), ("timm.efficientnet_b0", "sequential"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "placement"), GATED)
def test_exits_on_a_converted_model_keep_its_output_its_costs_and_the_original_places(name, placement):
    size = (3, ZOO_BY_NAME[name].size, ZOO_BY_NAME[name].size)
    e = _exits(name, placement).eval()
    lc = e.backbone
    x = example(name, batch=8, seed=2) * torch.linspace(0.5, 2, 8)[:, None, None, None]  # images far apart, so gates differ
    with torch.no_grad():
        out = e(x)
        assert torch.equal(out, lc(x))
    report = lcsurgery.count_macs(lc, x, progress=False)
    assert 0 < report.ratio < 1 and len(set(report.per_sample.tolist())) > 1, "the test needs gates that differ per image"
    assert torch.equal(e.last_macs, report.per_sample)  # no exit taken: exactly what count_macs charges
    costs = static_costs(lc, size)
    assert e.exit_costs()[-1] == costs.open + sum(e._counts(size).heads) and e.dense_macs() == costs.dense
    scores = score(e, x, progress=False)
    assert torch.equal(scores.costs[:, -1], report.per_sample + sum(e._counts(size).heads))
    assert all(bool((scores.costs[:, i] <= e.exit_costs()[i]).all()) for i in range(e.num_exits + 1))  # open gates bound every image
    plain = exit_points(original(name), input_size=size)
    assert [(p.name, p.fraction) for p in e.points] == [(p.name, p.fraction) for p in _exits(name).points]
    assert [(p.name, p.fraction) for p in exit_points(lc, input_size=size)] == [(p.name, p.fraction) for p in plain]


def test_a_gated_images_cost_at_an_exit_is_its_truncated_gated_networks():
    model = resnet20().eval()
    lc = lcsurgery.convert(model, placement="sequential").eval()
    randomize_gates(lc, seed=5)
    e = add_exits(lc, ["layer1.1", "layer2"])
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        e.forward_exits(x)
    stem, blocks = _stem_and_blocks(model)
    for i, n in enumerate([2, 6]):
        cut = lcsurgery.convert(nn.Sequential(*stem, *blocks[:n]), placement="sequential", input_size=(3, 32, 32)).eval()
        for mine, theirs in zip(cut.lc_blocks(), lc.lc_blocks()):
            mine.load_state_dict(theirs.state_dict())
        heads = sum(fvcore_macs(h, (m,)) for h, m in zip(e.heads[: i + 1], [torch.zeros(1, 16, 32, 32), torch.zeros(1, 32, 16, 16)][: i + 1]))
        assert torch.equal(e.last_exit_costs[:, i], lcsurgery.count_macs(cut, x, progress=False).per_sample + heads)


def test_the_cap_holds_for_every_gated_image():
    lc = lcsurgery.convert(resnet20().eval(), placement="parallel").eval()
    randomize_gates(lc, seed=1)
    e = add_exits(lc)
    _randomize_heads(e)
    costs = e.exit_costs()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    e.policy = ExitPolicy((1.1,) * e.num_exits, max_macs=costs[3])
    with torch.no_grad():
        e(x)
    assert int(e.last_macs.max()) <= costs[3] and e.last_exit.tolist() == [3] * len(x)
    assert len(set(e.last_macs.tolist())) > 1  # each image pays its own gates up to the forced exit


def test_images_that_left_run_no_later_layer():
    e = add_exits(resnet20().eval())
    ran = []
    e.backbone.layer3.register_forward_hook(lambda *_: ran.append(1))
    e.policy = ExitPolicy((0.0,) * e.num_exits)  # every image is confident enough at the first exit
    with torch.no_grad():
        e(torch.randn(1, 3, 32, 32))
    assert ran == [] and e.last_exit.tolist() == [0] and e.last_macs.tolist() == [e.exit_costs()[0]]


def test_the_cap_holds_for_every_image_and_a_cap_below_the_first_exit_is_refused():
    e = add_exits(resnet20().eval())
    _randomize_heads(e)
    costs = e.exit_costs()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    e.policy = ExitPolicy((1.1,) * e.num_exits, max_macs=costs[2] + 1)  # nobody confident enough: only the cap stops them
    with torch.no_grad():
        e(x)
    assert int(e.last_macs.max()) <= costs[2] + 1 and e.last_exit.tolist() == [2] * len(x)
    with pytest.raises(LCSurgeryError, match=r"below the cheapest exit \(5,163,520 MACs"):
        set_budget(e, 0.5, calibration=x, max_macs=costs[0] - 1)


def test_threshold_policy_is_the_largest_mean_cost_within_the_budget():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(500, 5, generator=g)
    scores = ExitScores(conf, torch.zeros(500, 5, dtype=torch.long), None)
    costs, dense = [10, 25, 45, 70, 101], 100
    every = sorted({float(c) for c in conf[:, :4].flatten()} | {2.0})
    mean = {t: float(simulate(scores, costs, ExitPolicy((t,) * 4))[1].double().mean()) for t in every}
    for budget in (0.3, 0.5, 0.8):
        policy = threshold_policy(scores, costs, dense, budget)
        best = max(m for m in mean.values() if m <= budget * dense)
        assert mean[policy.thresholds[0]] == best
    with pytest.raises(LCSurgeryError, match="below what the exits can reach: every image leaving at the first exit costs 0.100"):
        threshold_policy(scores, costs, dense, 0.05)


def test_a_learned_policy_reads_what_confidence_misses():
    """Exits whose correctness shows in the margin, not the confidence: at the same budget the
    learned rule sends the right images out early and keeps more of the network's accuracy."""
    g = torch.Generator().manual_seed(0)
    n, k = 4000, 3
    features = torch.rand(n, k + 1, 3, generator=g)
    labels = torch.zeros(n, dtype=torch.long)
    right = features[:, :, 1] > 0.5  # an exit is right exactly where its margin is large
    right[:, -1] = True
    prediction = torch.where(right, labels[:, None], torch.ones_like(right, dtype=torch.long))
    scores = ExitScores(features[:, :, 0], prediction, labels, None, features)
    costs, dense = [20, 45, 70, 101], 100
    conf = threshold_policy(scores, costs, dense, 0.5)
    learned = threshold_policy(scores, costs, dense, 0.5, scorer=fit_scorer(scores))

    def accuracy(policy):
        exit_of, macs = simulate(scores, costs, policy)
        assert macs.double().mean() <= 50
        return float((prediction.gather(1, exit_of[:, None]).squeeze(1) == labels).double().mean())

    assert accuracy(learned) > accuracy(conf) + 0.2
    with pytest.raises(LCSurgeryError, match="rule must be one of confidence, learned, got 'oracle'"):
        set_budget(add_exits(resnet20().eval()), 0.5, calibration=scores, rule="oracle")


def test_set_budget_without_a_cap_at_full_budget_is_the_plain_network():
    e = add_exits(resnet20().eval())
    e.policy = ExitPolicy((0.5,) * e.num_exits)
    assert set_budget(e, 1.0, calibration=torch.randn(4, 3, 32, 32)) is None and e.policy is None


def test_points_by_name_and_fraction_and_clear_errors():
    m = resnet20().eval()
    names = [p.name for p in exit_points(m)]
    assert names == ["relu", "layer1.0", "layer1.1", "layer1", "layer2.0", "layer2.1", "layer2", "layer3.0", "layer3.1"]
    assert [p.name for p in add_exits(m, [0.5, 0.55]).points] == ["layer2.0", "layer2.1"]  # the nearest: 44.7% and 56.4%
    assert [p.name for p in add_exits(m, ["layer2", "layer1.0"]).points] == ["layer1.0", "layer2"]
    with pytest.raises(LCSurgeryError, match="no exit can go after 'layer9': the network narrows to one feature map only after relu, layer1.0"):
        add_exits(m, ["layer9"])
    with pytest.raises(LCSurgeryError, match=r"exit MAC fractions must be in \(0, 1\), got \[1.5\]"):
        add_exits(m, [0.3, 1.5])
    assert m.training is False and not any(n.startswith("heads") for n, _ in m.named_parameters())
    with pytest.raises(LCSurgeryError, match=r"score expects image tensors or \(images, labels\) batches, got str"):
        score(add_exits(m), ["not an image"])


def test_exit_model_state_dict_keeps_the_backbone_names():
    m = resnet20()
    e = add_exits(m)
    keys = set(e.state_dict())
    assert {f"backbone.{k}" for k in m.state_dict()} <= keys
    assert all(k.startswith(("backbone.", "heads.")) for k in keys)
    e2 = add_exits(copy.deepcopy(m))
    e2.load_state_dict(e.state_dict())
    x = torch.randn(2, 3, 32, 32)
    e.eval(), e2.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(e.forward_exits(x), e2.forward_exits(x), strict=True))


def test_a_pruned_networks_fractions_count_against_the_network_before_pruning():
    pytest.importorskip("torch_pruning", reason="the Torch-Pruning baseline needs lcsurgery[compare]")
    from lcsurgery.train.build import build_model
    from lcsurgery.train.config import FinetuneConfig

    structure = {"layer1.0.conv1": 8, "layer2.1.conv1": 16, "layer3.2.conv1": 20}  # as a pruned run's folder records it
    pruned = build_model(FinetuneConfig(model="cifar:resnet20", budget=0.8, prune="torch-pruning"), 10, structure).eval()
    ex = add_exits(pruned, "macs")
    x = torch.zeros(1, 3, 32, 32)
    assert ex.dense_macs() == fvcore_macs(resnet20().eval(), (x,))
    assert ex.exit_costs()[-1] - sum(ex.head_macs()) == fvcore_macs(pruned, (x,)) < ex.dense_macs()


def test_asking_for_a_gpu_where_none_is_visible_says_so(monkeypatch):
    from lcsurgery.train.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(LCSurgeryError, match="--device cuda:1: no CUDA device is visible to torch here"):
        resolve_device("cuda:1")
