"""The one exception type for bad input: the CLI prints its message as one line, exit 2."""


class EdtoolError(Exception):
    """Bad input or an unusable file; the message says what is wrong and how to fix it."""
