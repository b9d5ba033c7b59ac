"""Whether a run location given as a URL can be used at all, said in one line before anything is
opened: an unknown scheme, one whose fsspec package is not installed, or a read-only one (http://,
zip://) would otherwise surface as "exists but is not an edtool run store"."""

from edtool.errors import EdtoolError

# fsspec file systems that cannot keep a run: web servers, archives and references are read-only
ARCHIVES = ("zip", "tar", "libarchive")
READ_ONLY = (*ARCHIVES, "http", "https", "github", "gist", "git", "reference", "data", "dvc")


def check_location(location, writing: bool) -> None:
    """EdtoolError unless `location` (a path or URL) can hold a run: writing (compute) needs a scheme
    that takes files, reading one that fsspec can open here. A plain path is always fine here."""
    text = str(location)
    if "://" not in text or "::" in text:  # a path, or a chained URL left to fsspec
        return
    scheme = text.split("://", 1)[0].lower()
    if scheme in ("file", "local", "memory"):
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise EdtoolError(f"{text}: the URL scheme {scheme}:// is not one edtool can use (fsspec does not know it); "
                          "give a directory, or a URL such as file://, s3://, gs://") from None
    except ImportError as e:
        raise EdtoolError(f"{text}: the URL scheme {scheme}:// is not usable here: {' '.join(str(e).split())} "
                          "(install that package, or give a directory)") from None
    if not writing and scheme in ARCHIVES:  # fsspec would open the working directory as the archive
        raise EdtoolError(f"{text}: {scheme}:// names a path inside an archive, given after it: "
                          f"{scheme}://PATH::ARCHIVE (e.g. {scheme}://run::runs.{scheme}); or give a directory")
    if writing and scheme in READ_ONLY:
        raise EdtoolError(f"{text}: {scheme}:// is read-only, so a run cannot be kept there; give a directory or a "
                          "writable URL (file://, s3://, gs://, ...)")
