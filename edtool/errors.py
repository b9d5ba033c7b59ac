"""The one exception type for bad input: the CLI prints its message as one line, exit 2."""


class EdtoolError(ValueError):
    """Bad input or an unusable file; the message says what is wrong and how to fix it. A ValueError,
    so library callers that catch ValueError (bad argument values) catch it too."""
