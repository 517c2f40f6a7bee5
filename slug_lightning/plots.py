"""Figures of an unlearning run: Pareto scatter per tower and accuracy against λ (the paper's Fig. 2), the
image–text similarity matrix before and after (Fig. 3, 7, 8), and the course of the refinement rounds."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from slug_lightning.artifacts import atomic_path  # noqa: E402
from slug_lightning.layers import short_name  # noqa: E402


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_").lower()


def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def pareto_plot(path: Path, concept: str, tower: str, stats, chosen_layer: str | None, fronts: int = 1) -> None:
    """Importance against alignment (log–log) of one tower's candidate layers, the searched ``fronts`` labelled."""
    figure, axis = plt.subplots(figsize=(6.4, 4.8))
    rest = [s for s in stats if s.front > fronts]
    front = [s for s in stats if s.pareto]
    behind = [s for s in stats if 1 < s.front <= fronts]
    tiny = 1e-12  # log axes cannot show 0; an exactly orthogonal gradient is drawn at the floor
    if rest:
        axis.scatter(
            [max(s.alignment, tiny) for s in rest],
            [max(s.importance, tiny) for s in rest],
            marker="x",
            color="0.45",
            s=18,
            label="other layers",
        )
    axis.scatter(
        [max(s.alignment, tiny) for s in front],
        [max(s.importance, tiny) for s in front],
        color="tab:blue",
        s=30,
        label="Pareto front",
    )
    if behind:
        label = ("front 2" if fronts == 2 else f"fronts 2–{fronts}") + " (searched too)"
        axis.scatter(
            [max(s.alignment, tiny) for s in behind],
            [max(s.importance, tiny) for s in behind],
            color="tab:cyan",
            s=24,
            label=label,
        )
    for s in front + behind:
        axis.annotate(
            short_name(s.name),
            (max(s.alignment, tiny), max(s.importance, tiny)),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    for s in stats:
        if s.name == chosen_layer:
            axis.scatter(
                [max(s.alignment, tiny)],
                [max(s.importance, tiny)],
                s=160,
                facecolors="none",
                edgecolors="tab:red",
                linewidths=2,
                label=f"chosen: {short_name(s.name)}",
            )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("gradient alignment |cos(G_f, G_r)|  (lower is safer)")
    axis.set_ylabel("importance ‖G_f‖ / ‖θ‖")
    axis.set_title(f"{tower} layers for forgetting {concept!r}")
    if chosen_layer is not None and all(s.name != chosen_layer for s in stats):
        axis.text(
            0.99,
            0.01,
            f"chosen layer is in the other tower: {short_name(chosen_layer)}",
            fontsize=8,
            ha="right",
            va="bottom",
            transform=axis.transAxes,
            color="0.3",
        )
    axis.legend(fontsize=8)
    _save(figure, path)


def _plain_log_ticks(axis) -> None:
    # Log axes label ticks as 2×10^1 by default; step sizes read better as plain numbers (minor ticks:
    # only the 2s and 5s, or the labels collide).
    def some(value, _):
        text = f"{value:g}"
        return text if text.lstrip("0.")[:1] in ("2", "5") else ""

    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(FuncFormatter(some))


def search_plot(path: Path, concept: str, probes, chosen, metric: str = "top1") -> None:
    """One panel per searched layer: forget top-1/top-5 and each test set's top-1 against λ (Fig. 2c/d).

    The chosen probe is circled; its layer's title is red. A probe whose test sets were not evaluated (its forget
    images failed the forget test) has no test point: a grey tick at the top marks its λ.
    """
    layers = list(dict.fromkeys(p.layer for p in probes))
    columns = min(3, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.6 * columns, 3.4 * rows + 1.0), squeeze=False, sharey=True, layout="constrained"
    )
    test_sets = list(dict.fromkeys(name for p in probes for name in p.test_top1))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = [c for c in colours if c not in ("#d62728",)]  # red is the forget curves' colour
    for axis, layer in zip(axes.flat, layers):
        points = sorted((p for p in probes if p.layer == layer), key=lambda p: p.step_size)
        steps = [p.step_size for p in points]
        axis.plot(steps, [p.forget_top1 for p in points], "o-", color="tab:red", label="forget top-1")
        axis.plot(steps, [p.forget_top5 for p in points], "s--", color="tab:red", alpha=0.45, label="forget top-5")
        tested = [p for p in points if p.tested]
        skipped = [p.step_size for p in points if not p.tested]
        if skipped:
            axis.plot(skipped, [1.0] * len(skipped), "|", color="grey", markersize=10, label="test sets not evaluated")
        for colour, name in zip(colours, test_sets):
            axis.plot(
                [p.step_size for p in tested],
                [p.test_top1.get(name, math.nan) for p in tested],
                "o-",
                color=colour,
                markersize=4,
                label=f"test top-1: {name}",
            )
        is_chosen = chosen is not None and chosen.layer == layer
        if is_chosen:
            axis.scatter(
                [chosen.step_size],
                [chosen.forget_accuracy(metric)],
                s=180,
                facecolors="none",
                edgecolors="black",
                linewidths=1.8,
                zorder=5,
                label=f"chosen λ = {chosen.step_size:.3g}",
            )
        axis.set_xscale("log")
        _plain_log_ticks(axis)
        axis.set_ylim(-0.04, 1.04)
        axis.grid(alpha=0.3)
        axis.set_xlabel("step size λ")
        axis.set_title(
            short_name(layer) + ("  (chosen)" if is_chosen else ""),
            color="tab:red" if is_chosen else "black",
            fontsize=11,
        )
    for axis in axes[:, 0]:
        axis.set_ylabel("zero-shot accuracy")
    for axis in list(axes.flat)[len(layers) :]:
        axis.set_visible(False)
    handles = {label: handle for axis in axes.flat for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.suptitle(f"Step-size search for forgetting {concept!r}: every probe of every Pareto layer")
    figure.legend(
        handles.values(),
        handles.keys(),
        loc="outside lower center",
        ncol=min(len(handles), 5 if columns > 1 else 2),
        fontsize=9,
        frameon=False,
    )
    _save(figure, path)


def similarity_plot(
    path: Path, set_name: str, names: list[str], panels: list[tuple[str, object]], highlight: list[str] = ()
) -> None:
    """Image–text cosine similarity matrices side by side (Fig. 3, 7, 8): rows are names (text), columns
    the mean image embedding of each class; ``highlight`` names (the forgotten ones) in red.

    Args:
        path: The PNG to write.
        set_name: The evaluation set the classes come from.
        names: Row and column classes, in order.
        panels: ``(title, matrix)`` pairs, e.g. ``[("before unlearning", m0), ("after unlearning", m1)]``.
        highlight: Names to mark.
    """
    size = 0.62 * len(names) + 2.2
    figure, axes = plt.subplots(
        1, len(panels), figsize=(len(panels) * size + 1.2, size), squeeze=False, layout="constrained"
    )
    low = min(float(matrix.min()) for _, matrix in panels)
    high = max(float(matrix.max()) for _, matrix in panels)
    for axis, (title, matrix) in zip(axes[0], panels):
        image = axis.imshow(matrix.numpy(), cmap="viridis", vmin=low, vmax=high)
        for i in range(len(names)):
            for j in range(len(names)):
                value = float(matrix[i, j])
                axis.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < (low + high) / 2 else "black",
                )
        axis.set_xticks(range(len(names)), [f"images of {n}" for n in names], rotation=40, ha="right", fontsize=8)
        axis.set_yticks(range(len(names)), names, fontsize=8)
        for label in [*axis.get_xticklabels(), *axis.get_yticklabels()]:
            if any(label.get_text() in (h, f"images of {h}") for h in highlight):
                label.set_color("tab:red")
                label.set_fontweight("bold")
        axis.set_title(title, fontsize=11)
    figure.colorbar(image, ax=axes, shrink=0.8, label="cosine(text of row, mean image of column)")
    forgotten = f"; forgotten: {', '.join(highlight)}" if highlight else ""
    figure.suptitle(f"Image–text similarity on {set_name!r}{forgotten}", fontsize=12)
    _save(figure, path)


def refinement_plot(path: Path, panels: list[tuple[str, list]], metric: str = "top1") -> None:
    """Each test set's top-1 and the worst forget accuracy along the refinement rounds: the model the rounds start
    from, then the model each concept's visit left. One panel per concept order searched.

    Args:
        path: The PNG to write.
        panels: ``(title, visits)`` pairs, ``visits`` as ``SearchResult.visits``: ``(round, concept, summary)``.
        metric: The forget metric of the search.
    """
    longest = max(len(visits) for _, visits in panels)
    figure, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(6.0, 0.45 * longest + 3.0), 0.5 + 3.7 * len(panels)),
        squeeze=False,
        layout="constrained",
    )
    for axis, (title, visits) in zip(axes[:, 0], panels):
        points = [summary for _, _, summary in visits]
        steps = range(len(points))
        for name, test in points[0]["test"].items():
            if test["count"]:  # a set whose only images are forget concepts has no test accuracy
                axis.plot(steps, [p["test"][name]["top1"] for p in points], "o-", label=f"test top-1: {name}")
        axis.plot(
            steps,
            [max(f[metric] for f in p["forget"].values()) for p in points],
            "s--",
            color="tab:red",
            label=f"forget {metric}: worst concept",
        )
        labels = [f"round {r} · {concept}" if r else "before refinement" for r, concept, _ in visits]
        axis.set_xticks(list(steps), labels, rotation=40, ha="right", fontsize=8)
        axis.set_ylim(-0.04, 1.04)
        axis.set_ylabel("zero-shot accuracy")
        axis.grid(alpha=0.3)
        axis.set_title(title, fontsize=10)
    handles = {label: handle for axis in axes.flat for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle("Refinement rounds: the accuracies after each concept's visit")
    _save(figure, path)


def unlearn_plots(output: Path, result) -> list[str]:
    """Write every plot of a run into ``output``; returns their file names.

    Args:
        output: The run's directory.
        result: The finished search, a :class:`~slug_lightning.results.SearchResult`.
    """
    names = []
    for concept, stats in result.layers.items():
        chosen = result.chosen.get(concept)
        for tower in sorted({s.tower for s in stats}):
            name = f"pareto_{_slug(concept)}_{tower}.png"
            pareto_plot(
                output / name,
                concept,
                tower,
                [s for s in stats if s.tower == tower],
                chosen.layer if chosen else None,
                result.settings["fronts"],
            )
            names.append(name)
        # The curves are the search of METHOD §9 in the kept order; a refined choice (round >= 1) is circled at its
        # own λ.
        probes = [
            p
            for p in result.probes
            if p.concept == concept and not p.round and p.order == result.kept_order and math.isfinite(p.step_size)
        ]
        if probes:
            name = f"search_{_slug(concept)}.png"
            search_plot(output / name, concept, probes, chosen, result.metric)
            names.append(name)
    if result.visits:
        ends = result.ends  # several concept orders: one panel each
        panels = (
            [
                (
                    f"order {index + 1}: {', '.join(end.order)}" + ("  (kept)" if index == result.kept_order else ""),
                    end.visits,
                )
                for index, end in enumerate(ends)
            ]
            if len(ends) > 1
            else [("", result.visits)]
        )
        refinement_plot(output / "refinement.png", panels, result.metric)
        names.append("refinement.png")
    for set_name, (rows, concepts, before, after) in result.similarity.items():
        name = f"similarity_{_slug(set_name)}.png"
        similarity_plot(
            output / name,
            set_name,
            rows,
            [("before unlearning", before), ("after unlearning", after)],
            highlight=concepts,
        )
        names.append(name)
    return names


def comparison_plot(path: Path, rows: list[dict]) -> None:
    """Utility (mean test top-1) against forget top-1 of every run of ``compare``; kept settings ringed."""
    figure, axis = plt.subplots(figsize=(6.4, 4.8))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    colours = plt.get_cmap("tab10")
    for index, method in enumerate(methods):
        runs = [row for row in rows if row["method"] == method]
        axis.scatter(
            [100 * r["forget_top1"] for r in runs],
            [100 * r["utility"] for r in runs],
            s=28,
            color=colours(index),
            label=method.upper(),
            marker="*" if method == "slug" else "o",
        )
        for run in runs:
            if run.get("selected"):
                axis.scatter(
                    [100 * run["forget_top1"]],
                    [100 * run["utility"]],
                    s=150,
                    facecolors="none",
                    edgecolors=colours(index),
                    linewidths=1.5,
                )
            if run["setting"] != "-":
                axis.annotate(
                    run["setting"],
                    (100 * run["forget_top1"], 100 * run["utility"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                    color="0.35",
                )
    axis.set_xlabel("forget top-1 (%)  (lower: forgotten)")
    axis.set_ylabel("utility: mean test top-1 (%)")
    axis.set_title("Unlearning methods: utility against forgetting (ringed: kept setting)")
    axis.legend(fontsize=8)
    _save(figure, path)
