"""What a run says: ``--quiet``, the default and ``--verbose`` (slug_lightning.console), and the flags on the command
line."""

from __future__ import annotations

import logging
import warnings

import pytest
from conftest import one_line_error
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from slug_lightning import console
from slug_lightning.cli import main, split_verbosity

# What Lightning and the libraries under it say on an ordinary run (the words of each), and whether each verbosity
# shows it.
WARNINGS = [
    # (category, message, shown when quiet, normal, verbose)
    (FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated", (False, False, True)),
    (DeprecationWarning, "``instantiate_classes`` was deprecated in v4.49.0", (False, False, True)),
    (UserWarning, "predict returned None if it was on purpose, ignore this warning...", (False, False, True)),
    (PossibleUserWarning, "The 'predict_dataloader' does not have many workers which may be a bottleneck.", (0, 0, 1)),
    # the project's own warnings are the user's business
    (UserWarning, "Shard 'a.tar' is truncated or corrupt", (True, True, True)),
]
LIGHTNING_WARNING = "The number of training batches (4) is smaller than the logging interval"  # rank_zero_warn
LINES = [
    ("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]", (False, False, True)),
    ("TPU available: False, using: 0 TPU cores", (False, False, True)),
    ("GPU available: False, used: False", (False, True, True)),
    ("[slug] pre-flight: the captions of 4 forget shard(s) read", (False, True, True)),
]


@pytest.fixture(autouse=True)
def normal_output_after():
    yield
    console.configure_output("normal")


@pytest.mark.parametrize("index, verbosity", list(enumerate(console.VERBOSITIES)))
def test_each_verbosity_shows_what_it_should(index, verbosity):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    library = logging.getLogger("lightning.pytorch")
    library.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            console.configure_output(verbosity)
            for category, message, _ in WARNINGS:
                warnings.warn(message, category, stacklevel=1)
            for line, _ in LINES:
                rank_zero_info(line)
            rank_zero_warn(LIGHTNING_WARNING)
    finally:
        library.removeHandler(handler)
    shown = [message for _, message, shown in WARNINGS if shown[index]]
    assert [str(w.message) for w in caught] == [*shown, LIGHTNING_WARNING]
    assert [r.getMessage() for r in records] == [line for line, shown in LINES if shown[index]]


def test_a_later_verbosity_replaces_an_earlier_one():
    console.configure_output("quiet")
    console.configure_output("verbose")
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.INFO
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.configure_output("verbose")
        warnings.warn("deprecated", DeprecationWarning, stacklevel=1)
    assert len(caught) == 1


def test_the_flags_anywhere_on_the_command_line(capsys):
    assert split_verbosity(["unlearn", "--config", "a.yaml", "--quiet"]) == ("quiet", ["unlearn", "--config", "a.yaml"])
    assert split_verbosity(["--verbose", "demo"]) == ("verbose", ["demo"])
    assert split_verbosity(["demo"]) == (None, ["demo"])
    one_line_error(capsys, ["--quiet", "unlearn", "--verbose"], "--quiet", "--verbose")


def test_a_command_without_a_flag_keeps_the_verbosity(capsys):
    # as `demo --quiet` runs `fit` and `unlearn` through the command line in its own process
    for args in (["--quiet", "make-world", "--help"], ["make-world", "--help"]):
        with pytest.raises(SystemExit):
            main(args)
        assert console.verbosity() == "quiet"
