"""Pre-flight checks of an ``unlearn`` run: every input problem found before the first forward pass.

:func:`preflight` runs at the start of :meth:`SlugTrainer.unlearn <slug_lightning.trainer.SlugTrainer.unlearn>`.
It is cheap next to the gradient pass: the evaluation sets' file lists are built and each image file is
opened and verified by PIL (its header, and for PNG its chunk checksums, without decoding the pixels: the
demo world's 600 evaluation images in about 30 ms of a 0.9 s pre-flight), every shard is opened and its first
block read (a URL that does not answer, a ``pipe:`` command that fails, a file that is no tar), and the captions of
the forget shards are read once, from img2dataset's ``.parquet`` index beside each shard where there is one, else
from the tar (nothing is written to disk); it says what that read cost. Each problem is a
:class:`~slug_lightning.errors.UserError` that says what was given, what is valid and which option it came
from; the CLI prints it as one line and exits with status 2.
"""

from __future__ import annotations

import difflib
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from slug_lightning.errors import UserError

DATA = "data.init_args"
SEARCH = "search.init_args"
# A concept whose spellings match more than this share of the captions is warned about (the demo world's
# people are 2.5 % each); above LaionDataModule(max_forget_share) the run is refused.
WARN_FORGET_SHARE = 0.05
# When the forget shards are not the training shards, how many of the training shards are read to measure how
# common a concept's spellings are in captions at large.
SHARE_SHARDS = 4


def preflight(model, datamodule, search, scan_captions: bool = True, smoke: bool = False) -> None:
    """Check evaluation sets, forget concepts and shards of an unlearn run before any compute.

    Checks, in order: every evaluation set loads (folder exists, class folders hold images, classes agree
    with ``class_names``, every image file opens and verifies); every forget concept is a class with images
    in its forget set; the shards resolve; and, when ``scan_captions``, that every shard opens and starts like a
    tar (:func:`check_shard_sources`), no shard is unreadable, every concept has at least
    ``datamodule.min_forget_pairs`` captions mentioning it, broken samples stay under ``model.max_skipped_fraction``,
    and no concept matches more than ``datamodule.max_forget_share`` of the captions (above
    :data:`WARN_FORGET_SHARE` a warning). The captions are read as ``datamodule.caption_index`` says, by the
    datamodule's :meth:`~slug_lightning.datamodules.LaionDataModule.caption_scan`, whose forget pairs the gradient
    pass then reads. Datamodules other than ``LaionDataModule`` get the evaluation checks.

    Damage inside a tar whose captions came from its index, and pairs whose image does not decode, are found by the
    gradient pass when it reads them, and counted against ``max_skipped_fraction`` there.

    A smoke run (``smoke``, ``--trainer.fast_dev_run``) reads the forget shards' captions only until every
    concept has ``min_forget_pairs`` of them, so the readability and broken-sample checks cover the shards read;
    a concept no caption mentions is still found (after reading them all). How common a concept's spellings are
    (``max_forget_share``) needs every caption and is left to the real run.

    Args:
        model: The GradientCollector (``max_skipped_fraction`` is read from it when present).
        datamodule: The datamodule of the run (``LaionDataModule`` for the shard checks).
        search: The StepSearch with the evaluation sets.
        scan_captions: Read the forget shards' captions (skip it when the gradients are reused).
        smoke: A smoke run: read captions only until there are enough (see above).

    Raises:
        UserError: The first problem found.
    """
    concepts = list(getattr(datamodule, "concepts", None) or [])
    chosen = getattr(model, "concepts", None)
    names = [c.name for c in concepts] if chosen is None else list(chosen)
    check_eval_sets(search, names)
    if not hasattr(datamodule, "forget_shards"):
        return
    from slug_lightning.shard_scan import scan_shards
    from slug_lightning.shard_sources import READ_TIMEOUT
    from slug_lightning.shards import expand_shards

    if not concepts:
        raise UserError(f"No concept to forget: set {DATA}.concepts, e.g. [{{name: 'Elon Musk'}}].")
    urls = {}
    for option in ("shards", "forget_shards"):
        try:
            urls[option] = expand_shards(getattr(datamodule, option))
        except (FileNotFoundError, ValueError) as error:
            raise UserError(f"{DATA}.{option}: {error}") from None
    if not scan_captions:
        return
    timeout = getattr(datamodule, "read_timeout", READ_TIMEOUT)
    mode = getattr(datamodule, "caption_index", "tar")
    check_shard_sources(urls, timeout)
    min_pairs = getattr(datamodule, "min_forget_pairs", 1)
    enough = min_pairs if smoke else None
    started = time.perf_counter()
    if hasattr(datamodule, "caption_scan"):  # the datamodule keeps the scan: its forget streams read its pairs
        scan = datamodule.caption_scan(enough)
    else:
        scan = scan_shards(urls["forget_shards"], concepts, enough=enough, caption_index=mode, timeout=timeout)
    rank_zero_info(caption_read_note(scan, time.perf_counter() - started))
    check_shards_readable(scan)
    check_concept_pairs(scan, concepts, min_pairs)
    check_skipped(scan, getattr(model, "max_skipped_fraction", 1.0))
    if smoke:
        return
    if urls["shards"] == urls["forget_shards"]:
        check_forget_share(scan, concepts, getattr(datamodule, "max_forget_share", 1.0), f"{DATA}.shards")
    else:  # forget shards may be pre-filtered for the concept: how common a spelling is shows in the others
        sample = urls["shards"][:SHARE_SHARDS]
        where = f"the first {len(sample)} of {len(urls['shards'])} shard(s) of {DATA}.shards"
        share_scan = scan_shards(sample, concepts, caption_index=mode, timeout=timeout)
        check_forget_share(share_scan, concepts, getattr(datamodule, "max_forget_share", 1.0), where)


def check_shard_sources(urls: dict[str, list[str]], timeout: float) -> None:
    """Every shard opens and starts like a tar archive: a missing URL, a server that does not answer, a ``pipe:``
    command that fails, or a file that is no tar is found before any compute
    (:func:`~slug_lightning.shard_sources.probe_shards`; ``pipe:`` shards beyond the first few are checked at their
    first read).

    Args:
        urls: The shards of each option (``shards``, ``forget_shards``).
        timeout: Seconds a remote source may take to answer (``read_timeout``).

    Raises:
        UserError: Naming the shards that failed the same way, why, and their option.
    """
    from slug_lightning.shard_sources import probe_shards

    failed = probe_shards(list(dict.fromkeys(urls["forget_shards"] + urls["shards"])), timeout)
    if not failed:
        return
    kind = failed[0][1]
    same = [(url, reason) for url, failure, reason in failed if failure == kind]
    named = ("shards",) if urls["shards"] == urls["forget_shards"] else ("shards", "forget_shards")
    options = "/".join(f"{DATA}.{o}" for o in named if any(url in urls[o] for url, _ in same))
    shown = "; ".join(f"{url!r} ({reason})" for url, reason in same[:5])
    more = f" and {len(same) - 5} more" if len(same) > 5 else ""
    if kind == "tar":
        raise UserError(
            f"{len(same)} shard(s) of {options} cannot be read as tar archives: {shown}{more}. Remove them from the "
            "pattern or repair them."
        )
    slow = any("read_timeout" in reason for _, reason in same)
    advice = f"; raise --{DATA}.read_timeout={timeout:g} for a slow source" if slow else ". Fix it or drop it"
    raise UserError(f"{len(same)} shard(s) of {options} cannot be read: {shown}{more}{advice}.")


def caption_read_note(scan, seconds: float) -> str:
    """What the pre-flight's caption read cost: the shards read from img2dataset's index and from the tars.

    Example::

        >>> from slug_lightning.shard_scan import ShardScan
        >>> caption_read_note(ShardScan(shards=2, indexed=["a.tar", "b.tar"]), 0.04)
        "[slug] pre-flight: the captions of 2 forget shard(s) read in 0.04 s, 2 from img2dataset's .parquet index"
    """
    note = f"[slug] pre-flight: the captions of {scan.shards} forget shard(s) read in {seconds:.3g} s"
    if not scan.tars:
        return f"{note}, {len(scan.indexed)} from img2dataset's .parquet index"
    import os

    from slug_lightning.shard_sources import local_path, source_kind

    local = [local_path(url) for url in scan.tars if source_kind(url) == "local" and os.path.isfile(local_path(url))]
    size = f" ({sum(map(os.path.getsize, local)) / 1e6:.1f} MB)" if local else ""
    why = f" ({scan.unindexed[0][1]})" if scan.unindexed else ""
    return (
        f"{note}: {len(scan.indexed)} from img2dataset's .parquet index, {len(scan.tars)} from their tars{size}, read "
        f"whole{why}; an index beside each tar is faster (docs/streaming.md)."
    )


def check_eval_sets(search, concepts: Sequence[str]) -> dict[str, str]:
    """Load the search's evaluation sets (file lists only) and find each concept's forget set.

    Args:
        search: A StepSearch (``sets``, ``forget_set`` and ``forget_sets``).
        concepts: The forget concepts' names.

    Returns:
        The forget set of each concept.

    Raises:
        UserError: A set that does not load (missing or empty folder, classes disagreeing with
            ``class_names``, an image file that is not a readable image), or a concept that is not a class
            with images of its forget set.
    """
    from slug_lightning.datamodules.labelled import LabelledImages
    from slug_lightning.evaluation import forget_sets_of

    datasets = {}
    for index, spec in enumerate(search.sets):
        where = f"{SEARCH}.sets[{index}] ({spec.name!r})"
        try:
            datasets[spec.name] = LabelledImages(spec, keep_classes=tuple(concepts))
        except (OSError, ValueError, KeyError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise UserError(f"{where}: {message}") from None
        check_images(datasets[spec.name].image_files or [], where)
    try:
        return forget_sets_of(list(concepts), datasets, search.forget_set)
    except ValueError as error:
        where = f"{SEARCH}.forget_set" if search.forget_set else f"{SEARCH}.sets"
        raise UserError(f"{error} ({where})") from None


def check_images(files: Sequence[Path], where: str) -> None:
    """Every file opens as an image and passes PIL's ``verify()``: its header parses and, for PNG, every chunk's
    checksum holds. Pixels are not decoded, so a JPEG cut short is found only when it is decoded.

    Raises:
        UserError: Naming the first bad file, why, how many more there are, and ``where`` (the set).
    """
    from PIL import Image

    bad = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            bad.append((path, error))
    if bad:
        path, error = bad[0]
        more = f" (and {len(bad) - 1} more of its {len(files)} images)" if len(bad) > 1 else ""
        raise UserError(
            f"{where}: image {str(path)!r} cannot be read ({type(error).__name__}: {error}){more}; "
            "remove or replace it."
        )


def check_shards_readable(scan) -> None:
    """Refuse shards that yield no sample at all (not a tar, empty, or damaged at the start); warn about
    shards damaged further in (their readable part is used, the rest counted as skipped).

    Raises:
        UserError: Naming every unreadable shard and why.
    """
    dead = [(url, reason) for url, reason, read, _ in scan.broken if read == 0]
    if dead:
        shown = "; ".join(f"{url!r} ({reason})" for url, reason in dead[:5])
        more = f" and {len(dead) - 5} more" if len(dead) > 5 else ""
        raise UserError(
            f"{len(dead)} shard(s) of {DATA}.forget_shards/shards cannot be read as tar archives: "
            f"{shown}{more}. Remove them from the pattern or repair them."
        )
    from slug_lightning.shards import describe_loss

    for url, reason, read, lost in scan.broken:
        warnings.warn(
            f"Shard {url!r} is damaged after {read} samples ({reason}); the rest of it is skipped: "
            f"{describe_loss(lost)}.",
            stacklevel=2,
        )


def near_matches(name: str, words: set[str], count: int = 5) -> list[str]:
    """Caption words and capitalised names closest to ``name`` (case-insensitive), best first.

    Example:
        >>> near_matches("Vesna Fairbanks", {"Vesna Fairbank", "Ines Yardley", "portrait", "Vesna"})
        ['Vesna Fairbank', 'Vesna']
    """
    by_lower: dict[str, str] = {}
    for word in sorted(words):
        by_lower.setdefault(word.lower(), word)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=count, cutoff=0.6)
    if len(close) < count and " " in name:  # a person's surname or first name alone
        for part in name.lower().split():
            close += [w for w in difflib.get_close_matches(part, list(by_lower), n=2, cutoff=0.8) if w not in close]
    return [by_lower[w] for w in close[:count]]


def check_concept_pairs(scan, concepts: Sequence, min_pairs: int) -> None:
    """Every concept needs ``min_pairs`` captions that mention it.

    Raises:
        UserError: For a concept no caption mentions (with the number of captions scanned and near matches)
            or one with fewer than ``min_pairs`` pairs.
    """
    for concept in concepts:
        found = scan.matches.get(concept.name, 0)
        spellings = " or ".join(repr(s) for s in concept.spellings)
        if found == 0:
            close = near_matches(concept.name, scan.words)
            hint = f"; near matches: {', '.join(map(repr, close[:3]))}" if close else ""
            raise UserError(
                f"No caption mentions {spellings} (scanned {scan.captions} captions of {DATA}.forget_shards){hint}. "
                "Fix the name or add aliases."
            )
        if found < min_pairs:
            raise UserError(
                f"Concept {concept.name!r} has {found} forget pairs in {scan.captions} captions, fewer than "
                f"{DATA}.min_forget_pairs={min_pairs} (a noisy gradient); add shards or aliases, or lower it."
            )


def check_skipped(scan, max_fraction: float) -> None:
    """Broken samples seen by the caption scan (no caption, no image, what damaged shards lost) within the limit.

    A damaged shard counts the samples it lost when img2dataset's files beside it say how many it holds, else 1
    (then the count is a lower bound, and the message says so).

    Raises:
        UserError: ``broken / samples > max_fraction``.
    """
    broken = scan.without_caption + scan.without_image + scan.lost
    total = scan.samples + scan.lost
    if total and broken / total > max_fraction:
        bound = " at least" if scan.lost_is_lower_bound else ""
        raise UserError(
            f"{broken} of {total} samples of {DATA}.forget_shards are{bound} broken ({broken / total:.1%}: "
            f"{scan.without_caption} without caption, {scan.without_image} without image, {scan.lost} lost in "
            f"{len(scan.broken)} damaged shard(s)), above --model.init_args.max_skipped_fraction={max_fraction}."
        )


def check_forget_share(scan, concepts: Sequence, max_share: float, where: str) -> None:
    """No concept's spellings may match a large share of captions at large.

    A forget set that is a slice of everything (an alias such as "a", a common word) gives a gradient of
    everything, and forgetting it damages the whole model while the run reports success.

    Args:
        scan: A caption scan of ``where`` with the concepts' match counts.
        concepts: The forget concepts.
        max_share: Refuse a concept above this share (``LaionDataModule(max_forget_share)``; 1 never refuses).
        where: The shards scanned, for messages.

    Raises:
        UserError: A concept above ``max_share``. Above :data:`WARN_FORGET_SHARE` it is a warning.
    """
    if not scan.captions:
        return
    for concept in concepts:
        found = scan.matches.get(concept.name, 0)
        share = found / scan.captions
        spellings = " or ".join(repr(s) for s in concept.spellings)
        measured = f"{spellings} match {found} of {scan.captions} captions of {where} ({share:.1%})"
        if share > max_share:
            raise UserError(
                f"{measured}, above --{DATA}.max_forget_share={max_share}: a slice of everything. Fix the name or "
                "alias, or raise it."
            )
        if share > WARN_FORGET_SHARE:
            warnings.warn(
                f"{measured}, more than {WARN_FORGET_SHARE:.0%}: check that no alias is a common word "
                f"(refused above {DATA}.max_forget_share={max_share}).",
                stacklevel=2,
            )
