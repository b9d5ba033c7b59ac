"""edtool.els.kernel: the compiled kernels' cache key."""

from edtool.els import kernel


def test_the_cache_key_changes_with_every_byte_of_the_source(tmp_path, monkeypatch):
    """A library built from an older kernel.cpp is never loaded for a changed one: the build's file name
    (els_<tag>.so) hashes the source, so one changed byte gives another name, and the same bytes the same."""
    source = kernel.SOURCE.read_bytes()
    key = kernel._cpu_tag()
    copy = tmp_path / "kernel.cpp"
    copy.write_bytes(source)
    monkeypatch.setattr(kernel, "SOURCE", copy)
    assert kernel._cpu_tag() == key
    copy.write_bytes(source.replace(b"constexpr int BL = 8;", b"constexpr int BL = 8; "))
    assert copy.read_bytes() != source
    assert kernel._cpu_tag() != key
