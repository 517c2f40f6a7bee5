"""Concepts to forget, and the caption filter that turns LAION-style pairs into forget sets (METHOD §1)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class Concept:
    """A concept to forget: a name plus aliases.

    A caption belongs to the concept when it mentions the name or any alias, case-insensitively and on
    word boundaries ("Musk" matches "Elon Musk's car" but not "muskrat").

    Args:
        name: The canonical name. It is also the class name looked up in the forget evaluation set.
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
            raise ValueError(f"A concept needs a non-empty name, got {self.name!r}.")
        object.__setattr__(self, "aliases", tuple(self.aliases))
        for alias in self.aliases:
            if not isinstance(alias, str) or not alias.strip():
                raise ValueError(f"Concept {self.name!r} has an empty alias in {list(self.aliases)!r}.")

    @property
    def spellings(self) -> tuple[str, ...]:
        """The name followed by its aliases."""
        return (self.name, *self.aliases)

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """A compiled regular expression matching any spelling on word boundaries, ignoring case."""
        # Longest spellings first so "Elon Musk" wins over "Musk" in match spans. Word boundaries are
        # written as look-arounds so spellings that start or end with punctuation still work.
        spellings = sorted(self.spellings, key=len, reverse=True)
        body = "|".join(r"\s+".join(map(re.escape, s.split())) for s in spellings)
        return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)

    def matches(self, caption: str) -> bool:
        """Whether ``caption`` mentions this concept."""
        return self.pattern.search(caption) is not None


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
    names = [c.name.lower() for c in result]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Concepts are listed twice: {duplicates}.")
    return result
