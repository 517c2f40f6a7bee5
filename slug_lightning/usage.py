"""Parser errors as one short line: the message of argparse or jsonargparse condensed, with the closest option name.

Shared by the Trainer commands (LightningCLI, :mod:`slug_lightning.trainer_cli`) and the plain commands
(:mod:`slug_lightning.commands.parsing`), so both families answer a mistake the same way.
"""

from __future__ import annotations

import difflib
import re

MAX_LENGTH = 200  # characters of an error line at most, "error: " included
# jsonargparse's explanation of a Union that did not validate: how it tried, not what was wrong.
_BOILERPLATE = re.compile(
    r"^(- )?(Does not validate against any of the|Subtypes:|Errors:|Given value type:|Given value:|"
    r"Expected a <class 'NoneType'>|Problem with given class_path|Parser key \"\w+\":$|Not a valid subclass of)"
)
# The config groups LightningCLI fills in subclass mode: their settings are under init_args.
SUBCLASS_GROUPS = ("model", "data", "search")
_OPTION = re.compile(r"--[\w.\-\[\]]+")


def condense(message: str) -> str:
    """One line of a parser's (possibly many-line) message: the key that failed and the first line that says why."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    keys = re.findall(r'Parser key "([\w.]+)"', message)
    reasons = [re.sub(r'^(Parser key "[\w.]+": )+', "", line) for line in lines if not _BOILERPLATE.match(line)]
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reasons[0] if reasons else lines[0]).removeprefix("- ")
    if keys and keys[0] in SUBCLASS_GROUPS:
        keys.insert(1, "init_args")
    key = ".".join(keys)
    if key and f'"{key}"' not in reason and key not in reason:
        reason = f"--{key}: {reason}"
    return reason


def suggestion(message: str, names: list[str], unknown: list[str] | None = None) -> str:
    """``"; did you mean --x?"`` for the closest of ``names`` to an unknown name (``unknown``, else the options
    ``message`` names that are not in ``names``), else ""."""
    if unknown is None:
        key = re.search(r"(?:Key|Option) '([\w.]+)' is not accepted", message)
        unknown = [key.group(1)] if key else [m for m in _OPTION.findall(message) if m not in names]
    for name in unknown:
        stem = name.split("=")[0]
        close = difflib.get_close_matches(stem, names, n=1, cutoff=0.6)
        if not close and not stem.startswith("--"):
            tails = {option.rsplit(".", 1)[-1]: option for option in names}
            close = [tails[t] for t in difflib.get_close_matches(stem, list(tails), n=1, cutoff=0.6)]
        if close:
            return f"; did you mean {close[0]}?"
    return ""


def error_line(message: str, command: str | None = None) -> str:
    """``error: MESSAGE (COMMAND --help)``, cut to :data:`MAX_LENGTH` characters."""
    hint = f" (see {command} --help)" if command else ""
    line = f"error: {message}"
    if len(line) + len(hint) > MAX_LENGTH:
        line = line[: MAX_LENGTH - len(hint) - 3].rstrip() + "..."
    return line + hint
