"""Shared pieces of the benchmarks: timing, small labelled image sets, printing tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image


def best_of(function: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of ``function``, in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def image_folder(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> str:
    """``root/<class>/<i>.png`` with random pictures; class names ``class 0``, ``class 1``, ..."""
    generator = torch.Generator().manual_seed(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return str(root)


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` (floats with 3 significant digits)."""

    def cell(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import os
    import platform

    # the kernel set torch picks for this CPU (AVX2, AVX512...) sets float rounding: the demo fit differs between sets
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"
    )


def world_and_fit(demo: str) -> Path:
    """The absolute path of a finished demo directory (``world/`` and ``fit/``); exits with a hint if it is not one."""
    path = Path(demo).resolve()
    if not (path / "fit" / "slug-tiny.safetensors").is_file() or not (path / "world" / "world.json").is_file():
        sys.exit(f"error: {path} holds no finished demo; run `python -m slug_lightning demo --output_dir {path}`.")
    return path


def publish(text: str, output: str | None) -> None:
    """Print a benchmark's markdown, and write it to ``output`` too when given."""
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
