"""The exception users see as a one-line message instead of a traceback."""


class UserError(ValueError):
    """A problem with what the user gave (a path, a name, a setting), explained in the message."""
