"""The one exception type for bad input.

Anything raised as :class:`SapfError` is the user's to fix: the CLI prints its message as a
single line on stderr and exits non-zero, without a traceback. Everything else is a bug.
"""


class SapfError(Exception):
    """A problem with the user's input, data or environment, explained in one line."""
