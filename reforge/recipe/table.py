"""The paper's table from a recipe's eval jobs: per dataset, the first model (the retriever) and each other model
(the readapted ones) side by side: nDCG@10, the change, the paired tests, and the average over datasets.

Written to the recipe's ``out`` folder as ``table.md`` and ``table.json``, and ``table.png`` (the change per
dataset) when matplotlib is installed. Read from each eval job's ``summary.json`` (`reforge.eval.write_outputs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reforge.recipe.plan import Job
from reforge.recipe.spec import Recipe
from reforge.recipe.state import write_if_changed


def build_tables(jobs: list[Job]) -> list[dict[str, Any]]:
    """One table per eval step, in recipe order: ``{"step", "measure", "baseline", "models", "rows", "average"}``.
    Each row: ``dataset``, ``scores`` (model -> score) and ``changes`` (model -> delta, p_ttest, p_randomization,
    wins, ties, losses against the baseline)."""
    tables: dict[str, dict[str, Any]] = {}
    for job in jobs:
        if job.kind != "eval":
            continue
        summary = json.loads((job.output / "summary.json").read_text())
        measure = summary["measures"][0]
        names = [m["name"] for m in summary["models"]]
        table = tables.setdefault(
            job.step.name, {"step": job.step.name, "measure": measure, "baseline": names[0], "models": [], "rows": []}
        )
        table["models"] += [n for n in names if n not in table["models"]]
        scores = {r["model"]: r["scores"][measure] for r in summary["results"]}
        changes = {
            c["model"]: {k: c[k] for k in ("delta", "p_ttest", "p_randomization", "wins", "ties", "losses")}
            for c in summary["comparisons"]
            if c["measure"] == measure
        }
        table["rows"].append({"dataset": job.dims["dataset"], "scores": scores, "changes": changes})
    for table in tables.values():
        table["average"] = _average(table)
    return list(tables.values())


def _average(table: dict[str, Any]) -> dict[str, Any]:
    """Per model: the mean score over the datasets it has, and the mean change over the datasets where both it and
    the baseline were scored (``datasets``: how many)."""
    baseline = table["baseline"]
    average = {}
    for model in table["models"]:
        rows = [r for r in table["rows"] if model in r["scores"]]
        paired = [r for r in rows if baseline in r["scores"]]
        average[model] = {
            "score": sum(r["scores"][model] for r in rows) / len(rows),
            "datasets": len(rows),
            "change": None
            if model == baseline or not paired
            else sum(r["scores"][model] - r["scores"][baseline] for r in paired) / len(paired),
        }
    return average


def markdown(table: dict[str, Any]) -> str:
    """The table in Markdown: a row per dataset and the average; per other model its score, change and p-values."""
    baseline, others = table["baseline"], [m for m in table["models"] if m != table["baseline"]]
    header = ["dataset", f"{baseline}"]
    for model in others:
        header += [model, "change", "p (t-test)", "p (randomization)"]
    lines = [_row(header), "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [row["dataset"], _score(row["scores"].get(baseline))]
        for model in others:
            change = row["changes"].get(model)
            cells += [_score(row["scores"].get(model))]
            cells += (
                [f"{change['delta']:+.4f}", _p(change["p_ttest"]), _p(change["p_randomization"])]
                if change
                else ["", "", ""]
            )
        lines.append(_row(cells))
    average = table["average"]
    cells = [f"average ({_count(len(table['rows']))})", _score(average[baseline]["score"])]
    for model in others:
        change = average[model]["change"]
        cells += [_score(average[model]["score"]), "" if change is None else f"{change:+.4f}", "", ""]
    lines.append(_row(cells))
    caption = (
        f"{table['measure']} (step {table['step']}); change and paired tests (t-test, randomization) against "
        f"{baseline} on the same queries."
    )
    return "\n".join([caption, "", *lines]) + "\n"


def write_tables(recipe: Recipe, jobs: list[Job]) -> tuple[dict[str, Any] | None, list[Path]]:
    """Write ``table.md``, ``table.json`` (and ``table.png``) into ``recipe.out``; returns the JSON and the paths.
    None and no files when the recipe has no eval step."""
    tables = build_tables(jobs)
    if not tables:
        return None, []
    data = {"recipe": recipe.path.name, "recipe_sha256": recipe.sha256, "tables": tables}
    text = "\n".join(markdown(t) for t in tables)
    json_text = json.dumps(data, indent=2) + "\n"
    previous = (recipe.out / "table.json").read_text() if (recipe.out / "table.json").is_file() else None
    written = [
        write_if_changed(recipe.out / "table.md", text.encode("utf-8")),
        write_if_changed(recipe.out / "table.json", json_text.encode("utf-8")),
    ]
    png = recipe.out / "table.png"
    if previous == json_text and png.is_file():
        written.append(png)  # the same numbers: the same picture
    elif plot_changes(tables, png) is not None:
        written.append(png)
    return data, written


def plot_changes(tables: list[dict[str, Any]], path: Path) -> Path | None:
    """A PNG of each model's change per dataset (one bar group per dataset); None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(max(6.4, 0.9 * sum(len(t["rows"]) for t in tables) + 2), 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels: list[str] = []
    changes: dict[str, dict[str, float]] = {}
    for table in tables:
        for row in table["rows"]:
            label = row["dataset"] if len(tables) == 1 else f"{row['dataset']} ({table['step']})"
            labels.append(label)
            for model, change in row["changes"].items():
                changes.setdefault(model, {})[label] = change["delta"]
    width = 0.8 / max(len(changes), 1)
    for i, (model, values) in enumerate(changes.items()):
        heights = [values.get(label, 0.0) for label in labels]
        axes.bar([x + i * width for x in range(len(labels))], heights, width, label=model)
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_xticks([x + width * (len(changes) - 1) / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
    axes.set_ylabel(f"change in {tables[0]['measure']} vs {tables[0]['baseline']}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _count(datasets: int) -> str:
    return f"{datasets} dataset" + ("" if datasets == 1 else "s")
