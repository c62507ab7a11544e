"""Gate statistics of a gated network with exits count what each image ran, up to its exit:
checked against the blocks the engine really calls at batch 1, and against ``count_macs`` when
no image leaves early."""

from __future__ import annotations

import pytest
import torch
from test_exits import _between, _scored

import lcsurgery
from lcsurgery.errors import LCSurgeryError
from lcsurgery.exits.model import ExitPolicy
from lcsurgery.exits.policy import simulate
from lcsurgery.exits.usage import GateDecisions, computed, usage
from lcsurgery.macs.report import dynamics
from lcsurgery.train.exits import policy_row


def _engine_decisions(e, x) -> tuple[list[dict], list[int]]:
    """Image by image at batch 1 under ``e.policy``: the gate decisions of the blocks the engine
    called (read in a forward hook, so a block that did not run leaves nothing), and each exit."""
    seen: dict[str, tuple[bool, torch.Tensor | None]] = {}
    hooks = [b.register_forward_hook(lambda m, *_: seen.__setitem__(m.name, (bool(m.last.keep()[0]), m.last.active()))) for b in e.backbone.lc_blocks()]
    per_image, exits = [], []
    try:
        with torch.no_grad():
            for n in range(len(x)):
                seen.clear()
                e(x[n : n + 1])
                per_image.append(dict(seen))
                exits.append(int(e.last_exit[0]))
    finally:
        for h in hooks:
            h.remove()
    return per_image, exits


@pytest.mark.parametrize(("name", "gated"), [("cifar.resnet20", "sequential"), ("tv.resnet18", "parallel")])
def test_what_ran_is_what_the_engine_runs_at_batch_one(name, gated):
    e, x, scores = _scored(name, gated)
    e.policy = ExitPolicy((_between(scores.confidence[:, :-1], 0.9),) * e.num_exits)
    exit_of, _ = simulate(scores, e.exit_costs(), e.policy)
    assert 0 < int((exit_of < e.num_exits).sum()) < len(x), "the test needs images leaving early and going on"
    ran = computed(scores.gates, e.block_segments(), exit_of)
    per_image, exits = _engine_decisions(e, x)
    assert exits == exit_of.tolist()
    blocks = list(e.backbone.lc_blocks())
    for n, seen in enumerate(per_image):
        for b in blocks:
            kept, active = seen.get(b.name, (False, None))
            if b.l_net is not None:
                assert bool(ran.layer[b.name][n]) == kept, (n, b.name)
            if b.c_net is not None:
                expected = active[0] & kept if b.name in seen else torch.zeros(b.gated_channels, dtype=torch.bool)
                assert torch.equal(ran.channel[b.name][n], expected), (n, b.name)
    assert any(b.name not in seen for seen in per_image for b in blocks), "some image must leave before a gated block"


def test_with_no_early_exit_the_usage_is_count_macs_usage():
    e, x, scores = _scored("cifar.resnet20", "sequential")
    every = torch.full((len(x),), e.num_exits)
    ran = usage(computed(scores.gates, e.block_segments(), every))
    report = lcsurgery.count_macs(e.backbone, x, progress=False)
    mine, theirs = ran.rates(), report.usage.rates()
    assert list(mine) == list(theirs)
    for n in mine:
        torch.testing.assert_close(mine[n], theirs[n])
    assert dynamics(report.per_sample, report.dense, ran)["distinct_patterns"] == report.dynamics()["distinct_patterns"]


def test_patterns_tell_exits_apart_and_gates_after_an_exit_are_off():
    d = GateDecisions({"a": torch.tensor([True, True, True]), "b": torch.tensor([True, True, True])}, {"b": torch.tensor([[1, 0], [1, 0], [0, 1]]).bool()})
    ran = computed(d, {"a": 0, "b": 1}, torch.tensor([0, 1, 1]))
    assert ran.layer["b"].tolist() == [False, True, True] and ran.channel["b"].tolist() == [[False, False], [True, False], [False, True]]
    u = usage(ran, torch.tensor([0, 1, 1]))
    assert u.layer_on == {"a": 3, "b": 2} and u.channel_on["b"].tolist() == [1, 1]
    assert len(set(u.patterns.tolist())) == 3
    same = usage(computed(d, {"a": 0, "b": 1}, torch.tensor([1, 1, 1])), torch.tensor([0, 1, 1]))  # same gates, image 0 left at another exit
    assert len(set(same.patterns[:2].tolist())) == 2


def test_a_sweep_row_of_a_gated_network_counts_what_ran():
    e, x, scores = _scored("cifar.resnet20", "sequential")
    scores.labels = torch.zeros(len(x), dtype=torch.long)
    policy = ExitPolicy((_between(scores.confidence[:, :-1], 0.9),) * e.num_exits)
    row = policy_row(e, scores, policy)
    exit_of, _ = simulate(scores, e.exit_costs(), policy)
    u = usage(computed(scores.gates, e.block_segments(), exit_of), exit_of)
    rates = torch.cat(list(u.rates().values()))
    assert row["distinct_patterns"] == len(set(u.patterns.tolist()))
    assert row["conditional_gates"] == pytest.approx(float(((rates > 0.05) & (rates < 0.95)).double().mean()))


def test_mismatched_decisions_are_refused():
    d = GateDecisions({"a": torch.tensor([True, False])}, {})
    with pytest.raises(LCSurgeryError, match="3 exits for 2 images"):
        computed(d, {"a": 0}, torch.tensor([0, 1, 1]))
    with pytest.raises(LCSurgeryError, match=r"blocks \['a'\] are in no segment"):
        computed(d, {}, torch.tensor([0, 1]))
