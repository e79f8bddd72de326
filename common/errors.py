"""The one exception type a user sees.

Anything the user can fix (a wrong path, a corrupt file, an exhausted budget, a wrong key) is raised
as a :class:`PrivtuneError` whose message names the offending thing and what to do about it. The CLI
prints these without a traceback; everything else is a bug and keeps its traceback.
"""


class PrivtuneError(Exception):
    """An error caused by input or state the user controls; the message says how to fix it."""


class BudgetExceededError(PrivtuneError):
    """A release was refused because it would exceed a configured privacy budget."""


class WrongKeyError(PrivtuneError):
    """A secret key does not match the one a table or file was made with."""
