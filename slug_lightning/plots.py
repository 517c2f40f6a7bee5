"""Figures of an unlearning run (the paper's Fig. 2): Pareto scatter per tower, accuracy against λ."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from slug_lightning.artifacts import atomic_path  # noqa: E402
from slug_lightning.layers import short_name  # noqa: E402


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_").lower()


def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def pareto_plot(path: Path, concept: str, tower: str, stats, chosen_layer: str | None) -> None:
    """Importance against alignment (log–log) of one tower's candidate layers, the front labelled."""
    figure, axis = plt.subplots(figsize=(6.4, 4.8))
    rest = [s for s in stats if not s.pareto]
    front = [s for s in stats if s.pareto]
    tiny = 1e-12  # log axes cannot show 0; an exactly orthogonal gradient is drawn at the floor
    axis.scatter([max(s.alignment, tiny) for s in rest], [max(s.importance, tiny) for s in rest],
                 marker="x", color="0.45", s=18, label="other layers")
    axis.scatter([max(s.alignment, tiny) for s in front], [max(s.importance, tiny) for s in front],
                 color="tab:blue", s=30, label="Pareto front")
    for s in front:
        axis.annotate(short_name(s.name), (max(s.alignment, tiny), max(s.importance, tiny)), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    for s in stats:
        if s.name == chosen_layer:
            axis.scatter([max(s.alignment, tiny)], [max(s.importance, tiny)], s=160, facecolors="none",
                         edgecolors="tab:red", linewidths=2, label=f"chosen: {short_name(s.name)}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("gradient alignment |cos(G_f, G_r)|  (lower is safer)")
    axis.set_ylabel("importance ‖G_f‖ / ‖θ‖")
    axis.set_title(f"{tower} layers for forgetting {concept!r}")
    axis.legend(fontsize=8)
    _save(figure, path)


def search_plot(path: Path, concept: str, layer: str, probes, chosen) -> None:
    """Forget top-1/top-5 and each test set's top-1 against the step size, for one searched layer."""
    probes = sorted(probes, key=lambda p: p.step_size)
    steps = [p.step_size for p in probes]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.plot(steps, [p.forget_top1 for p in probes], "o-", color="tab:red", label=f"forget top-1 ({concept})")
    axis.plot(steps, [p.forget_top5 for p in probes], "s--", color="tab:red", alpha=0.5, label="forget top-5")
    for name in probes[0].test_top1:
        axis.plot(steps, [p.test_top1[name] for p in probes], "o-", label=f"test top-1 ({name})")
    if chosen is not None and chosen.layer == layer:
        axis.axvline(chosen.step_size, color="black", linestyle=":", label=f"chosen λ={chosen.step_size:.3g}")
    axis.set_xscale("log")
    axis.set_ylim(-0.03, 1.03)
    axis.set_xlabel("step size λ")
    axis.set_ylabel("zero-shot accuracy")
    axis.set_title(f"{short_name(layer)}: moving along G_f for {concept!r}")
    axis.legend(fontsize=7, loc="best")
    _save(figure, path)


def unlearn_plots(output: Path, search) -> list[str]:
    """Write every plot of a run into ``output``; returns their file names."""
    names = []
    for concept, stats in search.layers.items():
        chosen = search.chosen.get(concept)
        for tower in sorted({s.tower for s in stats}):
            name = f"pareto_{_slug(concept)}_{tower}.png"
            pareto_plot(output / name, concept, tower, [s for s in stats if s.tower == tower],
                        chosen.layer if chosen else None)
            names.append(name)
        for layer in dict.fromkeys(p.layer for p in search.probes if p.concept == concept):
            probes = [p for p in search.probes if p.concept == concept and p.layer == layer]
            if not all(math.isfinite(p.step_size) for p in probes):
                continue
            name = f"search_{_slug(concept)}_{_slug(short_name(layer))}.png"
            search_plot(output / name, concept, layer, probes, chosen)
            names.append(name)
    return names
