"""Accuracy vs MACs: does per-input gating pay? Dense, static and dynamic runs side by side.

Per MAC budget, one table answers the question with the same data, epochs and recipe for every
row: the dense fine-tune; LC-Net's gates made static (``--static``: the same gates and
controller, bias only, one mask for every image); Torch-Pruning pruned to the budget and
fine-tuned (``--baselines torch-pruning``); and LC-Net's dynamic gates under both placements.
With ``--seeds 0 1`` every run but the dense teacher is repeated per seed and the table gives
the mean and each seed. ``--recipes`` adds sequential rows trained with the per-image gate
options (``RECIPES``), so the recipes meet the default and the baselines on one table. ``--exits``
adds per budget the dynamic and the static gates trained with early exits (``finetune --exits``)
a margin above the budget and set to it with ``set_budget`` on held-out training images: the rows
where per-image computation comes from exits as well as gates. Every run
is an ordinary ``lcsurgery finetune`` run folder under ``--out``: finished runs are reused (if
their configuration matches) and interrupted ones resumed. Writes ``results.json``,
``results.md`` and ``tradeoff.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lcsurgery.errors import LCSurgeryError
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.loop import finetune

BASELINES = ("static", "torch-pruning")
KIND_ORDER = ("dense", "static", "torch-pruning", "dynamic", "static+exits", "dynamic+exits")
EXIT_MARGIN = 0.1  # exits runs train this far above their budget, which the exits then bring them down to
# Gate-training recipes that make the gates decide per image: the options each sets over the base run.
RECIPES: dict[str, dict] = {
    "std": {"gate_input_momentum": 0.05},
    "importance": {"gate_input_momentum": 0.05, "per_image_loss": "importance"},
    "shaping": {"gate_input_momentum": 0.05, "per_image_loss": "shaping"},
    "difficulty": {"gate_input_momentum": 0.05, "per_image_loss": "difficulty"},
    "difficulty-layers": {"gate_input_momentum": 0.05, "per_image_loss": "difficulty", "static_channels": True},
}
RECIPE_LABELS = {
    "default": "",
    "std": "standardised gate input",
    "importance": "per-image channel targets + standardised input",
    "shaping": "batch-shaping + standardised input",
    "difficulty": "MAC penalty weighted by difficulty + standardised input",
    "difficulty-layers": "difficulty-weighted penalty, per-image layer gates, static channel gates",
}


@dataclasses.dataclass(frozen=True)
class Planned:
    """One run of the benchmark: its folder name, what it is, and its configuration."""

    name: str
    kind: str  # one of KIND_ORDER
    seed: int
    cfg: FinetuneConfig
    recipe: str = "default"  # for dynamic runs: "default" or a key of RECIPES
    budget: float | None = None  # the row's MAC budget: cfg.budget, or for exits runs the budget set_budget gives them


def plan(
    base: FinetuneConfig,
    budgets: list[float],
    out: Path,
    seeds: list[int] = (0,),
    baselines: tuple[str, ...] = ("static",),
    recipes: tuple[str, ...] = (),
    recipe_budgets: list[float] | None = None,
    exits: bool = False,
    exit_margin: float = EXIT_MARGIN,
) -> list[Planned]:
    """The dense run first (never distilled, seed 0), then per seed and budget the baselines, the
    dynamic runs of both placements, one sequential run per recipe (at ``recipe_budgets`` only,
    default every budget) and with ``exits`` the static and dynamic sequential runs trained with
    exits at ``budget + exit_margin``; ``teacher="dense"`` makes every other run distil from the
    benchmark's own dense run."""
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise LCSurgeryError(f"unknown baselines {sorted(unknown)}: choose from {', '.join(BASELINES)}")
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise LCSurgeryError(f"unknown recipes {sorted(unknown)}: choose from {', '.join(RECIPES)}")
    if base.exits is not None:
        raise LCSurgeryError("the trade-off base run has exits: pass exits=True (--exits) to add rows with exits beside the others")
    if exits and not 0 <= exit_margin < 1:
        raise LCSurgeryError(f"the exits runs' margin must be in [0, 1), got {exit_margin}")
    dense = dataclasses.replace(base, dense=True, budget=None, teacher=None, static=False, per_image_loss="none", seed=0, out=str(out / "dense"))
    runs = [Planned("dense", "dense", 0, dense)]
    if base.teacher == "dense":
        base = dataclasses.replace(base, teacher=str(out / "dense"))
    for seed in seeds:
        suffix = "" if seed == 0 else f"-s{seed}"
        for b in budgets:
            pct = round(100 * b)
            common = dict(budget=b, seed=seed)
            if "static" in baselines:
                runs.append(Planned(f"static-sequential-{pct}{suffix}", "static", seed, dataclasses.replace(base, placement="sequential", static=True, per_image_loss="none", **common)))
            if "torch-pruning" in baselines:
                runs.append(Planned(f"torch-pruning-{pct}{suffix}", "torch-pruning", seed, dataclasses.replace(base, prune="torch-pruning", placement="sequential", static=False, per_image_loss="none", **common)))
            for placement in ("sequential", "parallel"):
                runs.append(Planned(f"{placement}-{pct}{suffix}", "dynamic", seed, dataclasses.replace(base, placement=placement, **common)))
            for recipe in recipes if recipe_budgets is None or b in recipe_budgets else ():
                cfg = dataclasses.replace(base, placement="sequential", **RECIPES[recipe], **common)
                runs.append(Planned(f"{recipe}-sequential-{pct}{suffix}", "dynamic", seed, cfg, recipe))
            if exits:
                trained = dict(placement="sequential", per_image_loss="none", exits=["macs"], budget=round(min(1.0, b + exit_margin), 6), seed=seed)
                for kind, name, static in (("static+exits", "exits-static-sequential", True), ("dynamic+exits", "exits-sequential", False)):
                    runs.append(Planned(f"{name}-{pct}{suffix}", kind, seed, dataclasses.replace(base, static=static, **trained), budget=b))
    return [dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, out=str(out / r.name)), budget=r.cfg.budget if r.budget is None else r.budget) for r in runs]


def _check_same(run: Planned) -> None:
    """A finished run is reused only if it was made with the configuration the benchmark asks for."""
    saved = json.loads((Path(run.cfg.out) / "config.json").read_text())
    fields = FinetuneConfig.__dataclass_fields__
    diff = {k: (saved.get(k, fields[k].default), v) for k, v in run.cfg.identity().items() if saved.get(k, fields[k].default) != v}
    if diff:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise LCSurgeryError(f"{run.cfg.out} holds a run made with other options ({detail}): move it away or use another --out")


def run(
    base: FinetuneConfig,
    budgets: list[float],
    out: Path,
    train: bool = True,
    seeds: list[int] = (0,),
    baselines: tuple[str, ...] = ("static",),
    recipes: tuple[str, ...] = (),
    recipe_budgets: list[float] | None = None,
    jobs: int = 1,
    exits: bool = False,
    exit_margin: float = EXIT_MARGIN,
) -> list[dict]:
    """Run (or reuse) every fine-tune, then tabulate and plot; ``train=False`` reports the finished
    runs only. ``jobs > 1`` trains that many runs at once in separate processes (after the dense
    run, which the others distil from), each with an equal share of the CPU threads."""
    planned = plan(base, budgets, out, list(seeds), tuple(baselines), tuple(recipes), recipe_budgets, exits, exit_margin)
    todo = [r for r in planned if not (Path(r.cfg.out) / "metrics.json").exists()]
    if train:
        for r in todo:
            if r.kind == "dense":
                _train(r)
        _train_parallel([r for r in todo if r.kind != "dense"], jobs)
    rows = []
    for r in planned:
        folder = Path(r.cfg.out)
        if not (folder / "metrics.json").exists():
            print(f"== {r.name}: not finished, left out of the report")
            continue
        _check_same(r)
        m = json.loads((folder / "metrics.json").read_text())
        dyn = m.get("dynamics") or {}
        rows.append({
            "run": r.name, "kind": r.kind, "recipe": r.recipe, "seed": r.seed, "placement": m.get("placement"), "budget": r.budget,
            "val_accuracy": m["val_accuracy"], "mean_macs": m["mean_macs"], "dense_macs": m["dense_macs"],
            "mac_fraction": m["mean_macs"] / m["dense_macs"], "macs_by_placement": m.get("mean_macs_by_placement"),
            "p90_over_p10": (dyn.get("mac_fraction") or {}).get("p90_over_p10"), "distinct_patterns": dyn.get("distinct_patterns"),
            "conditional_gates": dyn.get("conditional_gates"), "images": dyn.get("images"),
        })  # fmt: skip
        if r.kind.endswith("+exits"):
            rows[-1].update(_at_budget(folder / "exits", r.budget), trained_for=r.cfg.budget, macs_by_placement=None)
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    if dense is None:
        raise LCSurgeryError(f"no finished dense run in {out}: the table compares against it")
    for r in rows:
        r["mac_fraction"] = r["mean_macs"] / dense["dense_macs"]  # every row against the same network: a gated one counts its gates
        r["accuracy_change_points"] = 100 * (r["val_accuracy"] - dense["val_accuracy"])
        r["within_5pct_of_budget"] = None if r["budget"] is None else abs(r["mac_fraction"] - r["budget"]) <= 0.05 * r["budget"]
    groups = summarise(rows)
    summary = {"config": dataclasses.asdict(base), "budgets": budgets, "seeds": list(seeds), "recipes": list(recipes), "rows": rows, "groups": groups}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    table = format_table(groups)
    (out / "results.md").write_text(table + "\n")
    print(table)
    from lcsurgery.viz.figures import tradeoff_plot

    tradeoff_plot(groups, out / "tradeoff.png", title=f"{base.model} on {Path(base.data).name}, {base.epochs} epochs per run")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'tradeoff.png'}")
    return rows


def _at_budget(exits_run: Path, budget: float) -> dict:
    """An exits run's test-set top-1, mean MACs, p90/p10, distinct patterns and conditional gates
    (of what each image ran, up to its exit) with its policy set to ``budget`` on its held-out
    images: its sweep's row, or when the sweep has none at that budget, a new one."""
    m = json.loads((exits_run / "metrics.json").read_text())
    row = next((s for s in m["sweep"] if abs(s["budget"] - budget) < 1e-9), None)
    if row is None:
        from lcsurgery.exits.policy import score
        from lcsurgery.train.exits import exit_run_at_budget, policy_row

        subset = json.loads((exits_run / "config.json").read_text()).get("test_subset")  # the test images its sweep scored
        model, _, policy, test = exit_run_at_budget(exits_run, budget, subset)
        row = policy_row(model, score(model, test, progress=False), policy)
    return {
        "val_accuracy": row["accuracy"], "mean_macs": row["mac_fraction"] * m["dense_macs"], "p90_over_p10": row["p90_over_p10"], "images": m["test_images"],
        "distinct_patterns": row.get("distinct_patterns"), "conditional_gates": row.get("conditional_gates"),
    }  # fmt: skip


def _train(r: Planned) -> None:
    """Train (or resume) one planned run in this process."""
    print(f"== {r.name}: training ({r.cfg.epochs} epochs)")
    folder = Path(r.cfg.out)
    resume = (folder / "last.pt").exists()
    finetune(dataclasses.replace(r.cfg, resume=resume, force=not resume))


def _train_quietly(r: Planned, threads: int) -> tuple[str, float]:
    """A worker process's run: its share of the threads, its output in its own ``train.log``."""
    torch.set_num_threads(threads)
    folder = Path(r.cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        _train(r)
    return r.name, json.loads((folder / "metrics.json").read_text())["val_accuracy"]


def _train_parallel(runs: list[Planned], jobs: int) -> None:
    """Train ``runs`` ``jobs`` at a time in fresh processes (spawned, so CUDA works in each),
    with one progress bar over the runs; a failed run is reported and the others go on."""
    if not runs:
        return
    if jobs <= 1:
        for r in runs:
            _train(r)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"training {len(runs)} runs, {jobs} at a time, {threads} thread(s) each; each run's output in its folder's train.log")
    failed = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_quietly, r, threads): r for r in runs}
        bar = tqdm(as_completed(futures), total=len(futures), desc="trade-off runs", dynamic_ncols=True)
        for f in bar:
            r = futures[f]
            try:
                name, acc = f.result()
                bar.write(f"== {name}: top-1 {100 * acc:.2f}%")
            except Exception as e:  # noqa: BLE001 - one broken run must not stop the others; it is named below
                failed.append(r.name)
                bar.write(f"== {r.name}: failed ({type(e).__name__}: {e}); see {Path(r.cfg.out) / 'train.log'}")
    if failed:
        raise LCSurgeryError(f"{len(failed)} trade-off run(s) failed: {', '.join(failed)}; rerun the command to retry them (finished runs are reused)")


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (kind, placement, recipe, budget): the mean over seeds, and each seed's values."""
    recipe_order = ("default", *RECIPES)
    key_of = lambda r: (r["kind"], r["placement"], r["recipe"], r["budget"])  # noqa: E731
    keys = sorted({key_of(r) for r in rows}, key=lambda k: (-(k[3] or 2), KIND_ORDER.index(k[0]), recipe_order.index(k[2]), k[1] or ""))
    groups = []
    dense = next(r for r in rows if r["kind"] == "dense")
    for kind, placement, recipe, budget in keys:
        members = sorted((r for r in rows if key_of(r) == (kind, placement, recipe, budget)), key=lambda r: r["seed"])
        mean = lambda k: statistics.fmean(r[k] for r in members) if all(r[k] is not None for r in members) else None  # noqa: E731
        groups.append({
            "kind": kind, "placement": placement, "recipe": recipe, "budget": budget, "seeds": [r["seed"] for r in members], "runs": [r["run"] for r in members],
            "val_accuracy": mean("val_accuracy"), "accuracies": [r["val_accuracy"] for r in members], "mean_macs": mean("mean_macs"),
            "mac_fraction": mean("mac_fraction"), "fractions": [r["mac_fraction"] for r in members], "dense_macs": dense["dense_macs"],
            "accuracy_change_points": 100 * (mean("val_accuracy") - dense["val_accuracy"]),
            "p90_over_p10": mean("p90_over_p10"), "distinct_patterns": mean("distinct_patterns"), "conditional_gates": mean("conditional_gates"),
            "images": members[0]["images"], "macs_by_placement": members[0]["macs_by_placement"], "trained_for": members[0].get("trained_for"),
        })  # fmt: skip
    return groups


def _label(g: dict) -> str:
    if g["kind"].endswith("+exits"):
        return ("LC-Net dynamic, sequential" if g["kind"] == "dynamic+exits" else "LC-Net static gates") + f" + exits (trained for {g['trained_for']:.2f})"
    if g["kind"] == "dynamic":
        recipe = RECIPE_LABELS[g["recipe"]]
        return f"LC-Net dynamic, {g['placement']}" + (f", {recipe}" if recipe else "")
    return {"dense": "dense", "static": "LC-Net static gates", "torch-pruning": "Torch-Pruning"}[g["kind"]]


def format_table(groups: list[dict]) -> str:
    """Markdown: per budget, each kind of run with its top-1 (mean and per seed), MACs and how dynamic it is."""
    lines = [
        "| MAC budget | run | top-1 (mean) | per seed | vs dense (points) | fraction of dense MACs | per-image MACs p90/p10 | distinct gate patterns | conditional gates |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        budget = "-" if g["budget"] is None else f"{g['budget']:.2f}"
        seeds = " / ".join(f"{100 * a:.2f}" for a in g["accuracies"])
        fractions = " / ".join(f"{f:.3f}" for f in g["fractions"])
        spread = "-" if g["p90_over_p10"] is None else f"{g['p90_over_p10']:.2f}"
        patterns = "-" if g["distinct_patterns"] is None else f"{g['distinct_patterns']:.0f} of {g['images']}"
        cond = "-" if g["conditional_gates"] is None else f"{100 * g['conditional_gates']:.1f}%"
        lines.append(
            f"| {budget} | {_label(g)} | {100 * g['val_accuracy']:.2f}% | {seeds} | {g['accuracy_change_points']:+.2f} | {fractions} | {spread} | {patterns} | {cond} |"
        )
    verdicts = []
    for budget in sorted({g["budget"] for g in groups if g["budget"] is not None}, reverse=True):
        at = {(g["kind"], g["placement"]): g for g in groups if g["budget"] == budget and g["recipe"] == "default"}
        dynamic = [g for g in groups if g["budget"] == budget and (g["kind"], g["placement"]) in (("dynamic", "sequential"), ("dynamic+exits", "sequential"))]
        for dyn in dynamic:
            recipe = dyn["recipe"]
            name_of_dyn = "dynamic + exits" if dyn["kind"] == "dynamic+exits" else "dynamic (sequential)" if recipe == "default" else f"dynamic (sequential, {recipe})"
            others = (("static", "sequential"), "static gates"), (("torch-pruning", None), "Torch-Pruning")
            if dyn["kind"] == "dynamic+exits":
                others += ((("static+exits", "sequential"), "static gates + exits"),)
            for key, name in others:
                if key in at:
                    change = 100 * (dyn["val_accuracy"] - at[key]["val_accuracy"])
                    verdicts.append(f"- budget {budget:.2f}: {name_of_dyn} minus {name}: {change:+.2f} points of top-1")
    if any(g["kind"].endswith("+exits") and g["distinct_patterns"] is not None for g in groups):
        verdicts.append("- with exits, patterns and conditional gates count what each image ran: its own gates up to the exit it left at, and that exit")
    return "\n".join(lines + ([""] + verdicts if verdicts else []))
