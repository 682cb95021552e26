"""Exceptions the engine raises on purpose. The worker maps them to exit codes (see cli)."""


class BadInputError(ValueError):
    """Input the user can fix: the message says what is wrong and how to fix it (exit code 2)."""


class CancelledError(Exception):
    """The run was cancelled (SIGTERM or a cancel callback); exit code 3."""
