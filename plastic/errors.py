"""Errors that the command line reports as one line with exit status 2."""
import difflib


class PlasticError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class SpecError(PlasticError, ValueError):
    """A circuit or protocol spec, or an argument, that fails validation."""


class DataError(PlasticError):
    """A data set that is missing, corrupt or of the wrong shape."""


class ResultsError(PlasticError):
    """A results file that is missing or cannot be read."""


def suggest(key, known) -> str:
    """" (did you mean 'x'?)" for the closest of ``known`` to a misspelt ``key``, else ""."""
    m = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""
