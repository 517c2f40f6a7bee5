"""Safety: shard member names never become paths, and the DDP configs bound how long a dead rank can stall
the others."""

from __future__ import annotations

import datetime
import functools
import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import slug_lightning
from slug_lightning.cli import main
from slug_lightning.concepts import Concept
from slug_lightning.datamodules.laion import PairStream
from slug_lightning.shard_scan import count_kept, scan_shards
from slug_lightning.trainer import SlugTrainer

CONFIGS = Path(slug_lightning.__file__).resolve().parents[1] / "configs"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size = 0 if link else len(data)
    info.type = kind
    info.linkname = link
    tar.addfile(info, None if link else io.BytesIO(data))


def test_member_names_with_parent_dirs_or_absolute_paths_write_nothing(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    absolute = tmp_path / "absolute_evil"
    shard = work / "evil.tar"
    png = _png()
    with tarfile.open(shard, "w") as tar:
        _add(tar, "../../evil.txt", b"Ada Lovelace, escaping the shard")
        _add(tar, "../../evil.png", png)
        _add(tar, f"{absolute}.txt", b"Ada Lovelace, written to an absolute path")
        _add(tar, f"{absolute}.png", png)
        _add(tar, "link.txt", b"", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "good.txt", b"Ada Lovelace at her desk")
        _add(tar, "good.png", png)
    before = sorted(p for p in tmp_path.rglob("*"))

    stream = PairStream([str(shard)], lambda image: image.size, lambda captions: [[0]] * len(captions), 8)
    stream._collate = lambda share: share.keys  # keep it model-free: the keys read are what matters
    (keys,) = list(stream)
    scan = scan_shards([str(shard)], [Concept("Ada Lovelace")])
    count = count_kept([str(shard)])

    assert sorted(p for p in tmp_path.rglob("*")) == before, "reading the shard created files"
    assert not Path(f"{absolute}.txt").exists() and not (tmp_path / "evil.txt").exists()
    # The names are only keys of in-memory samples; the symlink member is not followed.
    assert keys == ["../../evil", str(absolute), "good"]
    assert scan.matches == {"Ada Lovelace": 3} and count == 3


def _strategy_of(args: list[str], tmp_path: Path):
    """The Trainer strategy the CLI builds for ``unlearn`` with ``args`` (the run itself is not started)."""
    seen = {}

    @functools.wraps(SlugTrainer.unlearn)
    def capture(self, *_, **__):
        seen["strategy"] = self.strategy

    original = SlugTrainer.unlearn
    SlugTrainer.unlearn = capture
    try:
        code = main(
            [
                "unlearn",
                "--config",
                str(CONFIGS / "demo" / "unlearn.yaml"),
                *args,
                "--model.init_args.pretrained",
                "null",
                "--trainer.logger",
                "false",
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    finally:
        SlugTrainer.unlearn = original
    assert code == 0
    return seen["strategy"]


@pytest.mark.parametrize("config, minutes", [("gpus.yaml", 30), ("ddp_cpu.yaml", 10)])
def test_ddp_configs_set_a_collective_timeout(tmp_path, config, minutes):
    from lightning.pytorch.strategies import DDPStrategy

    # gpus.yaml on this CPU-only machine: the same strategy, with the accelerator overridden.
    overrides = ["--trainer.accelerator", "cpu", "--trainer.devices", "2"] if config == "gpus.yaml" else []
    strategy = _strategy_of(["--config", str(CONFIGS / "trainer" / config), *overrides], tmp_path)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._timeout == datetime.timedelta(minutes=minutes)


def test_ddp_timeout_is_overridable_on_the_command_line(tmp_path):
    strategy = _strategy_of(
        ["--config", str(CONFIGS / "trainer" / "ddp_cpu.yaml"), "--trainer.strategy.init_args.timeout", "0:05:00"],
        tmp_path,
    )
    assert strategy._timeout == datetime.timedelta(minutes=5)
