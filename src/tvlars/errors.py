"""Errors that are the user's to fix (bad flags, missing data, unreadable files).

The command line prints a :class:`UserError` as one line and exits non-zero; any other
exception is a bug in tvlars and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
