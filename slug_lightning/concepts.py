"""Concepts to forget, and the caption filter that turns LAION-style pairs into forget sets (METHOD §1)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property

from slug_lightning.errors import ConfigError


@dataclass(frozen=True)
class Concept:
    """A concept to forget: a name plus aliases.

    A caption belongs to the concept when it mentions the name or any alias, case-insensitively and on
    word boundaries ("Musk" matches "Elon Musk's car" but not "muskrat"). Both sides are compared as
    :func:`name_key` writes them, so a name with accents matches whether the caption composes them ("é") or
    not ("e" and a combining accent, as some scrapers and macOS file names write it).

    Args:
        name: The canonical name, kept in composed Unicode (NFC). It is also the class name looked up in the
            forget evaluation set.
        aliases: Other spellings that also mark a caption as belonging to the concept.

    Example::

        >>> Concept("Elon Musk", aliases=("Musk",)).matches("A photo of musk at a launch")
        True
        >>> Concept("Elon Musk", aliases=("Musk",)).matches("A muskrat in a river")
        False
    """

    name: str
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"A concept needs a non-empty name, got {self.name!r}.", "name", self.name)
        object.__setattr__(self, "name", unicodedata.normalize("NFC", self.name))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        for alias in self.aliases:
            if not isinstance(alias, str) or not alias.strip():
                raise ConfigError(
                    f"Concept {self.name!r} has an empty alias in {list(self.aliases)!r}.",
                    "aliases",
                    list(self.aliases),
                )
        object.__setattr__(self, "aliases", tuple(unicodedata.normalize("NFC", alias) for alias in self.aliases))

    @property
    def spellings(self) -> tuple[str, ...]:
        """The name followed by its aliases."""
        return (self.name, *self.aliases)

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """A compiled regular expression matching any spelling on word boundaries, in :func:`name_key` form
        (match it against ``name_key(caption)``)."""
        # Longest spellings first so "Elon Musk" wins over "Musk" in match spans. Word boundaries are
        # written as look-arounds so spellings that start or end with punctuation still work; they hold in
        # composed text only (a decomposed accent is not a word character, so "Jose" would match "José").
        spellings = sorted(map(name_key, self.spellings), key=len, reverse=True)
        body = "|".join(r"\s+".join(map(re.escape, s.split())) for s in spellings)
        return re.compile(rf"(?<!\w)(?:{body})(?!\w)")

    def matches(self, caption: str) -> bool:
        """Whether ``caption`` mentions this concept."""
        return self.pattern.search(name_key(caption)) is not None


def name_key(text: str) -> str:
    """``text`` as names and captions are compared: case-folded, in composed Unicode (NFC).

    Canonical caseless matching (decompose, case-fold, compose again): "Zoë" written with U+00EB or with "e"
    and U+0308, in any case, gives one key.

    Example::

        >>> name_key("Zoe\u0308 Ÿ STRASSE") == name_key("zoë ÿ straße")
        True
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


def as_concepts(concepts: list[Concept | str | dict]) -> list[Concept]:
    """Normalise a config's concept list (names, dicts or Concepts) to Concepts, rejecting duplicates."""
    result = []
    for item in concepts:
        if isinstance(item, Concept):
            result.append(item)
        elif isinstance(item, str):
            result.append(Concept(item))
        elif isinstance(item, dict):
            result.append(Concept(item["name"], tuple(item.get("aliases", ()))))
        else:
            raise TypeError(f"A concept is a name, a dict with 'name'/'aliases', or a Concept; got {item!r}.")
    names = [name_key(c.name) for c in result]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"Concepts are listed twice: {duplicates}.", "concepts", concepts)
    return result
