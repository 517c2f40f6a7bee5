"""The parser of the plain commands: argparse in the style of the Trainer commands.

Errors are one line with the closest option (a :class:`~slug_lightning.errors.UsageError`, printed by
:func:`slug_lightning.cli.main`, exit 2) instead of the usage; a switch takes ``--flag``, ``--flag true`` or
``--flag false`` as LightningCLI's do; dashes in option names are read as underscores; no abbreviated options
(LightningCLI's parser takes none either).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from slug_lightning.errors import UsageError
from slug_lightning.usage import suggestion

_VALUES = {"true": True, "false": False}


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` raising one-line :class:`UsageError` s and taking ``--switch true|false``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        names = [option for action in self._actions for option in action.option_strings]
        raise UsageError(message + suggestion(message, names), self.prog)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        return super().parse_known_args(None if args is None else self._normalised(list(args)), namespace)

    def _normalised(self, args: list[str]) -> list[str]:
        """Option names with underscores; ``--switch true`` as ``--switch``, ``--switch false`` as nothing."""
        args = [underscored(arg) for arg in args]
        switches = {
            option: isinstance(action, argparse._StoreTrueAction)
            for action in self._actions
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            for option in action.option_strings
        }
        result: list[str] = []
        index = 0
        while index < len(args):
            name, equals, value = args[index].partition("=")
            if name in switches:
                if not equals and index + 1 < len(args) and args[index + 1].lower() in _VALUES:
                    value, equals = args[index + 1], "="
                    index += 1
                if equals:
                    if value.lower() not in _VALUES:
                        self.error(f"argument {name}: expected true or false, got {value!r}")
                    if _VALUES[value.lower()] != switches[name]:
                        index += 1
                        continue
                result.append(name)
            else:
                result.append(args[index])
            index += 1
        return result


def underscored(arg: str) -> str:
    """``--output-dir=x`` as ``--output_dir=x``; anything that is not an option as it is."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, equals, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + equals + value
