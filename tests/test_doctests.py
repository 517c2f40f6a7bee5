"""Every example in the package's docstrings runs and shows what it says (``>>>`` lines; ``Example::`` blocks without
them are illustrations, not run)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import slug_lightning
import slug_lightning.callbacks
import slug_lightning.datamodules


def _modules() -> list[str]:
    """Every module of the package that has a docstring example (``datamodules/`` and ``callbacks/`` live outside
    the package's folder, so they are walked on their own)."""
    names = []
    packages = (slug_lightning, slug_lightning.datamodules, slug_lightning.callbacks)
    infos = [
        info for package in packages for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")
    ]
    for info in infos:
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        if doctest.DocTestFinder(exclude_empty=True).find(module):
            names.append(info.name)
    return names


MODULES = _modules()


def test_the_examples_are_found():
    # the method's core carries examples; finding none would mean the discovery broke, not that all passed
    assert {
        "slug_lightning.search",
        "slug_lightning.layers",
        "slug_lightning.deltas",
        "slug_lightning.datamodules.laion",
    } <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} example(s) of {name} failed"
