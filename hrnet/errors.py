"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class HrnetError(Exception):
    """Bad input or environment, described so that the user can fix it."""


class IncompleteError(HrnetError):
    """An output (data set, checkpoint set, export) without its manifest.json: it was
    never finished, or is still being written."""


class BadValue(HrnetError, ValueError):
    """A parameter's value that cannot run (a ValueError too, for callers that check values)."""
