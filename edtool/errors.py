"""The one exception type for bad input: the CLI prints its message as one line, exit 2."""


class EdtoolError(ValueError):
    """Bad input or an unusable file; the message says what is wrong and how to fix it. A ValueError,
    so library callers that catch ValueError (bad argument values) catch it too."""


# OS errors that say where a file cannot go, not that edtool is wrong: (why, what to do)
_DISK_ERRORS = {"ENOSPC": ("no space left on the device", "free some space and run the same command again"),
                "EDQUOT": ("disk quota exceeded", "free some space and run the same command again"),
                "EACCES": ("permission denied", "choose a location you can write, or fix its permissions"),
                "EPERM": ("operation not permitted", "choose a location you can write, or fix its permissions"),
                "EROFS": ("read-only file system", "choose a location on a writable disk"),
                "ENOTDIR": ("a part of the path is a file, not a folder", "choose another location")}


def disk_error_line(err: BaseException):
    """One line for an OS error about a location (disk full, permission, read-only, not a folder),
    found in `err` or what caused it, naming the path; None for any other error. What edtool
    finished before it is kept: stores and files are written whole or not at all."""
    import errno

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code = errno.errorcode.get(getattr(err, "errno", None) or -1) if isinstance(err, OSError) else None
        if code in _DISK_ERRORS:
            why, fix = _DISK_ERRORS[code]
            where = err.filename if err.filename is not None else "a file"
            verb = "write" if code in ("ENOSPC", "EDQUOT", "EROFS") else "access"
            return f"cannot {verb} {where}: {why}; {fix} (finished work is kept)"
        err = err.__cause__ or err.__context__
    return None
