"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class HrnetError(Exception):
    """Bad input or environment, described so that the user can fix it."""


class IncompleteError(HrnetError):
    """An output (data set, checkpoint set, export) without its manifest.json: it was
    never finished, or is still being written."""


class BadValue(HrnetError, ValueError):
    """A parameter's value that cannot run (a ValueError too, for callers that check values)."""


def with_article(word: str) -> str:
    """The word with its indefinite article: "an export", "a checkpoint"."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def first_line(e: BaseException) -> str:
    """The first line of an error's message (TensorFlow's OpErrors carry it in ``.message``)."""
    text = (getattr(e, "message", None) or str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__
