"""Optional dependencies: what each extra of pyproject.toml is for, and the one-line error naming the extra to
install when a feature needs a package that is missing.

- ``hf-datasets``: evaluation sets read from Hugging Face datasets (``LabelledSet(hf_dataset=...)``);
- ``diffusion`` / ``vlm``: carrying edits into Stable Diffusion / LLaVA-style pipelines (:mod:`slug_lightning.hf`);
- ``remote``: shards at fsspec URLs (``s3://``, ``gs://``; :mod:`slug_lightning.shard_sources`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from slug_lightning.errors import UserError


def install_hint(extra: str) -> str:
    """The command that installs an extra.

    Example::

        >>> install_hint("remote")
        'pip install "slug-lightning[remote]"'
    """
    return f'pip install "slug-lightning[{extra}]"'


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (cheap enough for a config check)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: an import that is known to fail
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or explain which extra installs it.

    Raises:
        UserError: if ``module`` cannot be imported; the message names ``extra``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(
            f"This needs the optional package {module!r} ({error}). Install it with {install_hint(extra)}."
        ) from None
