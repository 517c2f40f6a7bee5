"""The exceptions users see as a one-line message instead of a traceback."""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """A problem with what the user gave (a path, a name, a setting), explained in the message."""


class ConfigError(UserError):
    """A setting refused by the constructor of a class the command line builds, e.g. ``batch_size=0``.

    Constructor checks raise this rather than a plain ValueError: a ValueError from deeper inside (a bug) keeps
    its traceback, a ConfigError is the user's and is shown as one line. It is still a ValueError for callers.

    Args:
        message: What was given and what is valid.
        option: The constructor parameter it concerns; the command line looks it up in its configuration to name
            the full option (``--data.init_args.batch_size``).
        value: The value given, which tells that option apart from others of the same name.
    """

    def __init__(self, message: str, option: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.option = option
        self.value = value


class UsageError(UserError):
    """A command line its parser refuses (an unknown option, a value of the wrong type).

    Args:
        message: What was wrong, on one line (with a "did you mean" where a close name exists).
        command: The command it was given to (``slug-lightning unlearn``); the message points to its ``--help``.
    """

    def __init__(self, message: str, command: str) -> None:
        super().__init__(message)
        self.command = command


# Errors caused by what the user gave, shown as one line. Anything else is a bug and keeps its traceback: the
# constructors of the classes built from the config raise ConfigError (a UserError) for the settings they refuse,
# so a plain ValueError from inside one (a computation gone wrong) is not mistaken for the user's.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, PermissionError)


def first_cause(
    error: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...] = USER_ERRORS
) -> BaseException | None:
    """``error`` or the first of its explicit causes that is a ``kind`` (by default a user error), else None.

    jsonargparse re-raises an exception of a class it instantiates (a ModelLoadError of ``--model``) as a plain
    ValueError ``from`` the original, so the cause chain is where the user's problem is.
    """
    while error is not None and not isinstance(error, kind):
        error = error.__cause__
    return error


class NotForgotten(Exception):
    """Raised after an ``unlearn`` run given ``--require_forgotten true`` did not forget every concept the model
    knew. The run's artifacts are written (a result, not a failure); the command line exits with :attr:`exit_code`
    so that scripts and CI can tell."""

    exit_code = 3
