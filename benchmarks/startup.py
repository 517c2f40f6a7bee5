"""Start-up time of the command line: ``--help``, ``--version``, ``unlearn --help`` and every plain command's
``--help``, in fresh interpreters, against another version of the code (``--before REF``, a git commit) in the same run.

    python benchmarks/startup.py --before 662f5cb --output benchmarks/results/startup.md

Each command runs ``--repeats`` times in a new ``python -m slug_lightning`` process; the best wall time counts (the
first run of a session also pays for the disk cache). The version given by ``--before`` is exported with
``git archive`` into a temporary directory and run from there (its top-level ``callbacks``, ``datamodules`` and
``configs`` mapped into the package as the installed package maps this checkout's).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ["demo", "make-world", "audit", "compare", "delta", "export-diffusers", "export-llava", "eval-diffusion",
         "eval-vlm"]  # fmt: skip
COMMANDS = [["--help"], ["--version"], ["unlearn", "--help"], *([c, "--help"] for c in PLAIN)]
REFERENCE = [["-c", "import torch"], ["-c", "import lightning"]]  # what the commands avoid importing
# Maps the top-level subpackages of a checkout into slug_lightning, as the editable install does for this one.
SITECUSTOMIZE = """
import importlib.util, os, sys
ROOT = {root!r}
SUB = {{"slug_lightning.callbacks": "callbacks", "slug_lightning.datamodules": "datamodules",
        "slug_lightning.configs": "configs"}}
class _Finder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in SUB:
            folder = os.path.join(ROOT, SUB[name])
            return importlib.util.spec_from_file_location(
                name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
        return None
sys.meta_path.insert(0, _Finder)
"""


def seconds(arguments: list[str], environment: dict[str, str], repeats: int, where: Path) -> float:
    """Best wall time of ``python ARGUMENTS`` over ``repeats`` runs, started in ``where`` (not a checkout: ``-m``
    would import the package from the working directory)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *arguments], env=environment, cwd=where, capture_output=True, check=False)
        best = min(best, time.perf_counter() - start)
    return best


def exported(ref: str, into: Path) -> dict[str, str]:
    """The environment that runs version ``ref`` of the code, exported under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    hook = into / "_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE.format(root=str(into)))
    return {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{into}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="a git commit to compare with (default: none, this checkout alone)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", help="also write the table (markdown) here")
    args = parser.parse_args()
    now = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as folder:
        before = exported(args.before, Path(folder) / "before") if args.before else None
        rows = []
        for command in [*REFERENCE, *COMMANDS]:
            arguments = command if command[0] == "-c" else ["-m", "slug_lightning", *command]
            after = seconds(arguments, now, args.repeats, Path(folder))
            earlier = seconds(arguments, before, args.repeats, Path(folder)) if before and command[0] != "-c" else None
            rows.append((" ".join(command), earlier, after))
            print(rows[-1], flush=True)
    header = "| command | before (s) | now (s) | before / now |\n|---|---|---|---|"
    lines = [
        f"| `{name}` | {'' if old is None else f'{old:.2f}'} | {new:.2f} | "
        + ("" if old is None else f"{old / new:.1f}×")
        + " |"
        for name, old, new in rows
    ]
    text = "\n".join(
        [
            "# Start-up of the command line",
            "",
            f"`python benchmarks/startup.py --before {args.before} --repeats {args.repeats}`: best wall time of "
            f"{args.repeats} fresh processes per command; before = commit {args.before}. Machine: "
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. The `python -c` rows "
            "are the imports the commands now avoid.",
            "",
            header,
            *lines,
            "",
        ]
    )
    print(text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
