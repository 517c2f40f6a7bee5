"""The command in ``report.md`` that runs an ``unlearn`` again from its saved ``config.yaml``.

Copied as it is, it must run: the saved config names the finished run's directory, which ``unlearn`` refuses (and
``--overwrite true`` would replace the very run being reproduced). So the command gives a fresh ``--output_dir``
beside it, ``<run>_reproduced``, and moves there every Trainer setting that wrote under the run's directory (a
logger's ``save_dir``, ``default_root_dir``). The model, data and search settings are inputs: they are kept, so the
reproduction reads what the run read.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

SUFFIX = "_reproduced"
PROGRAM = ("python", "-m", "slug_lightning", "unlearn")


def fresh_dir(run_dir: str) -> str:
    """Where the reproduction writes: ``<run_dir>_reproduced`` (beside the run, as the run's path was written).

    Example::

        >>> fresh_dir("runs/demo/unlearn/"), fresh_dir("out")
        ('runs/demo/unlearn_reproduced', 'out_reproduced')
    """
    stripped = run_dir.rstrip("/\\")
    if not Path(stripped).name:  # ".", "..", "/": no name to extend; the absolute path has one
        stripped = os.path.abspath(stripped)
    return stripped + SUFFIX


def _under(value: str, run_dir: str) -> str | None:
    """``value``'s path relative to ``run_dir`` ("." for the directory itself) if it lies there, else None.

    Only a string written as a path (with a separator, or naming the directory itself) counts: with the run in the
    working directory, ``accelerator: cpu`` is not a file in it.
    """
    path, root = os.path.abspath(value), os.path.abspath(run_dir)
    if path == root:
        return "."
    if "/" not in value and os.sep not in value:
        return None
    return os.path.relpath(path, root) if path.startswith(root.rstrip(os.sep) + os.sep) else None


def _moved(value: Any, run_dir: str, fresh: str) -> Any:
    """``value`` with every path string under ``run_dir`` moved to the same place under ``fresh``."""
    if isinstance(value, str):
        relative = _under(value, run_dir)
        return value if relative is None else os.path.normpath(os.path.join(fresh, relative))
    if isinstance(value, list):
        return [_moved(item, run_dir, fresh) for item in value]
    if isinstance(value, dict):
        return {key: _moved(item, run_dir, fresh) for key, item in value.items()}
    return value


def moved_settings(trainer: dict, run_dir: str, fresh: str, prefix: str = "trainer") -> Iterator[tuple[str, Any]]:
    """``(option, new value)`` for every Trainer setting that names a path under ``run_dir``: a string or a mapping's
    leaf by its dotted option, a list (several loggers or callbacks) whole, as the command line takes them.

    Example::

        >>> logger = {"class_path": "CSVLogger", "init_args": {"save_dir": "runs/x", "name": "logs"}}
        >>> list(moved_settings({"logger": logger, "default_root_dir": "elsewhere"}, "runs/x", "runs/x_reproduced"))
        [('trainer.logger.init_args.save_dir', 'runs/x_reproduced')]
    """
    for key, value in trainer.items():
        option = f"{prefix}.{key}"
        if isinstance(value, dict):
            yield from moved_settings(value, run_dir, fresh, option)
        elif (moved := _moved(value, run_dir, fresh)) != value:
            yield option, moved


def reproduce_args(config: dict, config_path: str) -> list[str]:
    """The command line, as arguments, that reruns the ``unlearn`` saved as ``config`` (read from ``config_path``)
    into :func:`fresh_dir` of its ``output_dir``."""
    run_dir = str(config.get("output_dir") or "runs/unlearn")
    fresh = fresh_dir(run_dir)
    args = [*PROGRAM, "--config", config_path, "--output_dir", fresh]
    for option, value in moved_settings(config.get("trainer") or {}, run_dir, fresh):
        args += [f"--{option}", value if isinstance(value, str) else json.dumps(value)]
    return args


def reproduce_command(config_path: Path) -> str | None:
    """The shell command that reruns the ``unlearn`` whose resolved config is ``config_path`` (the ``config.yaml``
    the command line writes into the run's directory) into a fresh directory; None without a readable one."""
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    return shlex.join(reproduce_args(config, str(config_path)))
