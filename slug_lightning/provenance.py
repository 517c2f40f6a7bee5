"""Where a run came from: the software it ran on (``report.json``'s ``software``) and the weights it started
from, named so that the files a run ships say nothing about the machine it ran on.

- :func:`software`: Python, the package versions that decide a run's numbers, slug_lightning's version and,
  when the package runs from a git checkout, the commit (and whether the checkout had uncommitted changes).
- :func:`weights_source` and :func:`public_identity`: a ``pretrained`` tag stays as it is; a local checkpoint
  becomes ``sha256:<hex>`` of the file and its base name, never its path (``model.safetensors`` and
  ``delta.safetensors`` are made to be uploaded).

Nothing here fails a run: a version or commit that cannot be found is recorded as None.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path

# The distributions whose versions decide what a run computes, as pip names them.
PACKAGES = ("torch", "lightning", "torchmetrics", "open_clip_torch", "webdataset", "safetensors")
SHA256 = "sha256:"
# Suffixes of checkpoint files; a `pretrained` with one (or with a path separator) names a file, not a tag.
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_GIT_TIMEOUT_S = 10


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """The installed version of each distribution in ``names`` (None when it is not installed).

    Example::

        >>> package_versions(["no-such-distribution-xyz"])
        {'no-such-distribution-xyz': None}
    """
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def checkout_root(package_dir: Path) -> Path | None:
    """The repository root when ``package_dir`` (the directory of ``slug_lightning/``) lies in slug_lightning's
    own checkout, else None.

    The root must be the package directory's parent and hold ``pyproject.toml``: an installed copy in a
    ``site-packages`` inside someone else's git repository is not a checkout of this project.
    """
    root = package_dir.resolve().parent
    return root if (root / "pyproject.toml").is_file() and (root / ".git").exists() else None


def git_state(root: Path) -> dict | None:
    """``{"commit": <hex>, "dirty": bool}`` of the git checkout at ``root`` (dirty: tracked files differ from
    the commit), or None when ``root`` is not a git checkout or git is not available."""
    try:
        commit = _git(root, "rev-parse", "HEAD")
        toplevel = _git(root, "rev-parse", "--show-toplevel")
        changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if Path(toplevel).resolve() != root.resolve():  # `root` is a folder inside another repository
        return None
    return {"commit": commit, "dirty": bool(changes)}


def _git(root: Path, *args: str) -> str:
    environment = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # `git status` must not write the index
    done = subprocess.run(
        ["git", "-C", str(root), *args],
        capture_output=True,
        text=True,
        timeout=_GIT_TIMEOUT_S,
        check=True,
        env=environment,
    )
    return done.stdout.strip()


def software() -> dict:
    """``report.json``'s ``software``: Python, ``slug_lightning`` (version, and ``commit``/``dirty`` when run from
    a git checkout, else None) and ``packages`` ({distribution: version or None})."""
    import slug_lightning

    root = checkout_root(Path(slug_lightning.__file__).parent)
    state = git_state(root) if root is not None else None
    return {
        "python": platform.python_version(),
        "slug_lightning": getattr(slug_lightning, "__version__", None),
        "commit": state["commit"] if state else None,
        "dirty": state["dirty"] if state else None,
        "packages": package_versions(),
    }


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes (read once per path, size and modification time)."""
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def looks_like_path(pretrained: str) -> bool:
    """Whether a ``pretrained`` value is written as a file path rather than a tag (``laion400m_e32``)."""
    return "/" in pretrained or "\\" in pretrained or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES)


def weights_source(pretrained: str | None) -> dict:
    """How a run names the weights it started from: ``{"pretrained": ...}`` plus, for a local checkpoint,
    ``"pretrained_file"`` (its base name).

    A tag (or None, or an already hashed value) is kept; an existing file becomes ``sha256:<hex>`` of its bytes;
    a path to a file that is gone (in a record of an older version) keeps its base name only.

    Example::

        >>> weights_source("laion400m_e32")
        {'pretrained': 'laion400m_e32'}
        >>> weights_source("/gone/runs/fit/model.safetensors")
        {'pretrained': None, 'pretrained_file': 'model.safetensors'}
    """
    if pretrained is None or pretrained.startswith(SHA256):
        return {"pretrained": pretrained}
    path = Path(pretrained).expanduser()
    if path.is_file():
        return {"pretrained": SHA256 + file_sha256(path), "pretrained_file": path.name}
    if looks_like_path(pretrained):
        return {"pretrained": None, "pretrained_file": path.name}
    return {"pretrained": pretrained}


def public_identity(model: Mapping) -> dict:
    """A model identity (``GradientCollector.identity()``) as it may be shipped: ``pretrained`` through
    :func:`weights_source`, a pipeline directory by its base name.

    Example::

        >>> public_identity({"name": "ViT-B-32", "pretrained": "openai", "pipeline": "/home/me/sd-2-1"})
        {'name': 'ViT-B-32', 'pretrained': 'openai', 'pipeline': 'sd-2-1'}
    """
    identity = dict(model)
    if "pretrained" in identity:
        identity.update(weights_source(identity["pretrained"]))
    if isinstance(identity.get("pipeline"), str):
        identity["pipeline"] = Path(identity["pipeline"]).name or identity["pipeline"]
    return identity


def public_model_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Safetensors metadata with its ``model`` entry (an identity as JSON) passed through :func:`public_identity`;
    the rest, and a ``model`` entry that is not such an identity (fit's export writes the bare name), as it is."""
    metadata = dict(metadata)
    try:
        model = json.loads(metadata["model"])
    except (KeyError, TypeError, ValueError):
        return metadata
    if isinstance(model, dict):
        metadata["model"] = json.dumps(public_identity(model))
    return metadata
