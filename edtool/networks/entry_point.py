"""`py:package.module:attr` models (SPEC 14): any object with `score(t, x, label=None)` at edtool's t,
checked at every call and given the `ScoreModel` interface (`EntryPointModel`). Loading imports the
module, which runs its code: the user names it on the command line, as with any Python import.

    model, entry = load_entry_point("py:mypackage.models:ideal")
"""

import importlib
import inspect
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, Optional

from torch import Tensor

from edtool.diffusion import score_to_eps
from edtool.errors import EdtoolError
from edtool.memory import is_out_of_memory
from edtool.model import ScoreModel
from edtool.networks.source_checks import check_image_size, describe_exception, files_hash, positive_int


class ModelError(RuntimeError):
    """A `py:` model's own code failed at a point, or returned something other than a floating tensor of
    x's shape. A RuntimeError like any numeric failure: compute stores that cell as NaN with a warning that
    names the source and the exception, and goes on with the other cells."""


class EntryPointModel(ScoreModel):
    """A `py:` object with `score(t, x, label=None)` at edtool's t (optionally `eps`, `image_shape`,
    `num_classes`, `padding`, `to`), as a ScoreModel. Its calls are checked (ModelError)."""

    def __init__(self, obj, manifest: dict, source: str, has_eps: bool = False):
        self.obj = obj
        self.manifest = manifest
        self.source = source
        self.has_eps = has_eps
        self.conditional = manifest.get("num_classes") is not None

    @property
    def name(self) -> str:
        return self.manifest["arch"]

    def to(self, device=None, dtype=None) -> "EntryPointModel":
        with users_code(self.source, "to()"):
            if callable(getattr(self.obj, "to", None)):
                moved = self.obj.to(device=device, dtype=dtype)
                self.obj = moved if moved is not None else self.obj
        return self

    def score(self, t: Tensor, x: Tensor, label: Optional[Tensor] = None) -> Tensor:
        return self._call("score", t, x, label)

    def eps(self, t: Tensor, x: Tensor, label: Optional[Tensor] = None) -> Tensor:
        if self.has_eps:
            return self._call("eps", t, x, label)
        return score_to_eps(self._call("score", t, x, label), t)

    def _call(self, method: str, t: Tensor, x: Tensor, label: Optional[Tensor]) -> Tensor:
        """obj.<method>(t, x, label), or ModelError when it raises (SystemExit included) or returns anything
        but a floating tensor of x's shape."""
        try:
            out = getattr(self.obj, method)(t, x, label)
        except (Exception, SystemExit) as e:
            raise ModelError(f"{self.source}: its {method}() raised {describe_exception(e)}") from None
        if not isinstance(out, Tensor) or not out.is_floating_point() or out.shape != x.shape:
            got = f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else \
                f"a {type(out).__name__}"
            raise ModelError(f"{self.source}: its {method}() must return a floating tensor of x's shape "
                             f"{tuple(x.shape)}, got {got}")
        return out


@contextmanager
def users_code(source: str, what: str):
    """Run a py: source's own code: whatever it raises (SystemExit included) is its failure, one line naming
    the source and the exception, never edtool's internal error. An EdtoolError, Ctrl-C and out of memory
    (the machine's limit, which compute reports in its own line) pass through."""
    try:
        yield
    except EdtoolError:
        raise
    except (Exception, SystemExit) as e:
        if isinstance(e, Exception) and is_out_of_memory(e):
            raise  # the machine's limit, not the code's fault: compute says so in its own line
        raise EdtoolError(f"{source}: {what} raised {describe_exception(e)} (an error in that code, not in "
                          "edtool)") from None


def load_entry_point(source: str, image_shape: Optional[Callable] = None, device="cpu") -> tuple:
    """py:package.module:attr -> an EntryPointModel and its config entry (source, hash of the module file
    and of any `weights_files` the object lists)."""
    target = source[len("py:"):]
    module_name, _, attr = target.partition(":")
    if not module_name or not attr or module_name.startswith("."):
        raise EdtoolError(f"{source}: write py:package.module:attr with the module's full name (attr: the object "
                          "with score(t, x, label=None))")
    with users_code(source, f"importing {module_name}"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):  # not found itself
                raise EdtoolError(f"{source}: cannot import {module_name} ({e}); is it on PYTHONPATH?") from None
            raise  # a module it imports is missing: its own failure
    with users_code(source, f"making the model {attr}"):
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise EdtoolError(f"{source}: {module_name} has no attribute {attr}")
        if inspect.isclass(obj) or (not callable(getattr(obj, "score", None)) and callable(obj)):
            obj = obj()  # a class or factory: the model is what it returns
        if not callable(getattr(obj, "score", None)):
            raise EdtoolError(f"{source}: {attr} has no score(t, x, label=None) method (nor returns an object with "
                              "one)")
        found = {key: getattr(obj, key, None) for key in ("image_shape", "num_classes", "padding", "weights_files")}
        has_eps = callable(getattr(obj, "eps", None))
    shape = _entry_image_shape(found["image_shape"], source)
    manifest = {"arch": f"py:{type(obj).__name__}", "image_shape": shape or (image_shape() if image_shape else None),
                "padding": _entry_padding(found["padding"], source),
                "num_classes": _entry_num_classes(found["num_classes"], source)}
    module_file = inspect.getsourcefile(module) or getattr(module, "__file__", None)
    if module_file is None:
        raise EdtoolError(f"{source}: {module_name} has no source file whose hash the run could record; put the "
                          "model in a module file")
    files = [Path(module_file)] + _entry_weights_files(found["weights_files"], source)
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
    entry = {"source": source, "sha256": files_hash(root, [p.resolve() for p in files])}
    return EntryPointModel(obj, manifest, source, has_eps).to(device), entry


def _entry_image_shape(shape, source: str) -> Optional[list]:
    """A py: model's image_shape: None, or (C, H, W) of positive ints."""
    if shape is None:
        return None
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 3 \
            or not all(positive_int(v) for v in shape):
        raise EdtoolError(f"{source}: image_shape {shape!r} is not (channels, height, width) of positive ints")
    check_image_size(shape, source)
    return [int(v) for v in shape]


def _entry_num_classes(n, source: str) -> Optional[int]:
    """A py: model's num_classes: None (unconditional) or the number of classes, a positive int."""
    if n is not None and not positive_int(n):
        raise EdtoolError(f"{source}: num_classes {n!r} is not the number of classes (a positive int) or None "
                          "(unconditional)")
    return n


def _entry_padding(padding, source: str) -> str:
    """A py: model's padding (how --locality measures distance): zeros (default) or circular."""
    padding = "zeros" if padding is None else padding
    if padding not in ("zeros", "circular"):
        raise EdtoolError(f"{source}: padding {padding!r} is neither 'zeros' nor 'circular'")
    return padding


def _entry_weights_files(files, source: str) -> List[Path]:
    """A py: model's weights_files: a list of existing files (hashed into the run config)."""
    if files is None:
        return []
    if isinstance(files, (str, bytes, os.PathLike)) or not isinstance(files, (list, tuple)):
        raise EdtoolError(f"{source}: weights_files must be a list of file paths, got {files!r}")
    paths = [Path(p) for p in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EdtoolError(f"{source}: weights_files names {missing[0]}, which is no file"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return paths
