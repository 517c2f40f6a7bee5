"""How much the command line says: ``--quiet``, the default, or ``--verbose``.

Lightning and the libraries under it speak on every run: product tips, device lines, deprecations of their own
APIs, guesses about data loaders. A user of this command can act on none of it, so by default
(:func:`configure_output` ``"normal"``) those messages are dropped, by warning category and message and by
logging filters on Lightning's loggers, and the rest is left as the libraries emit it. ``"quiet"`` also drops
every informational line (Lightning's and this project's ``[slug] ...`` lines, which go through Lightning's
``rank_zero_info``), so that warnings, errors and the result are all that is shown; ``SlugTrainer`` then shows no
progress bar. ``"verbose"`` undoes all of it.

The command line calls :func:`configure_output` before anything runs, in every process: a DDP child re-runs the
command line, flags included. Without a flag it keeps the verbosity configured before (``"normal"`` in a new
process), so that the commands ``demo`` runs in its process keep the demo's. An explicit ``python -W ...`` or
``PYTHONWARNINGS`` is left to decide the warnings.
"""

from __future__ import annotations

import logging
import sys
import warnings

VERBOSITIES = ("quiet", "normal", "verbose")

# (category, message regex) of the warnings hidden unless verbose.
NOISE_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # Changes to the libraries' own APIs (torch, Lightning, jsonargparse, open_clip, timm): news for the people who
    # maintain this project, not for someone running it.
    (DeprecationWarning, ""),
    (PendingDeprecationWarning, ""),
    (FutureWarning, ""),
    # The gradient pass runs in Lightning's predict loop and sums gradients: it predicts nothing, on purpose.
    (UserWarning, "predict returned None"),
    # Lightning's guess from the machine's cores; the config's num_workers is a choice (memory, shard count).
    (UserWarning, r"The '\w+' does not have many workers"),
    # LaionDataModule gives a fit without val_sets an empty list of validation loaders, so that none runs.
    (UserWarning, "Total length of `list` across ranks is zero"),
    # The command line hands LightningCLI its arguments without --quiet/--verbose, which stay in sys.argv for
    # the DDP children to parse again.
    (UserWarning, "LightningCLI's args parameter is intended"),
)

# Beginnings of Lightning's informational lines hidden unless verbose: advertisements for its cloud products, and
# accelerators the machine does not have (the GPU line stays: it says what the run uses).
NOISE_LINES = ("💡 Tip", "TPU available", "HPU available")

# The loggers that Lightning's rank_zero_info/rank_zero_warn lines, and its other messages, go through.
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")

_verbosity = "normal"
_installed: dict = {"warnings": [], "levels": {}}


def verbosity() -> str:
    """The verbosity last configured (``"normal"`` until :func:`configure_output` is called)."""
    return _verbosity


def is_noise(line: str) -> bool:
    """Whether an informational line of Lightning's is one that only ``verbose`` shows."""
    return line.lstrip().startswith(NOISE_LINES)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


_DROP_NOISE = _DropNoise()


def configure_output(verbosity: str) -> None:
    """Set what the libraries show in this process for ``verbosity``: ``"quiet"``, ``"normal"`` or ``"verbose"``
    (see the module's docstring). Calling it again replaces the earlier setting.

    Raises:
        ValueError: An unknown verbosity.
    """
    if verbosity not in VERBOSITIES:
        raise ValueError(f"verbosity must be one of {VERBOSITIES}, got {verbosity!r}.")
    _undo()
    global _verbosity
    _verbosity = verbosity
    if verbosity == "verbose":
        return
    if not sys.warnoptions:  # python -W / PYTHONWARNINGS: the user chose the warnings to see
        for category, message in NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
            _installed["warnings"].append(warnings.filters[0])
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(_DROP_NOISE)
    if verbosity == "quiet":
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            _installed["levels"][name] = logger.level
            logger.setLevel(logging.WARNING)


def _undo() -> None:
    """Take out what the last :func:`configure_output` installed."""
    for entry in _installed["warnings"]:
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).removeFilter(_DROP_NOISE)
    for name, level in _installed["levels"].items():
        logging.getLogger(name).setLevel(level)
    _installed["warnings"], _installed["levels"] = [], {}
