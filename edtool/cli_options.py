"""The option helpers every command shares: each option takes its default and range from its settings
dataclass (edtool.config), so the command line and the library agree; and the parsers of list-valued
options (`--fsizes 32,64,128`, `--models unet,els`)."""

import shlex
import sys
from functools import partial
from typing import List, Optional

import typer

from edtool.config import RANGES, CalibrateConfig, ComputeConfig, SampleConfig, TrainConfig, default
from edtool.errors import EdtoolError


def int_list(text: str, what: str) -> List[int]:
    """'32,64,128' (or '32 64 128') -> [32, 64, 128]; an empty entry ('8,,16', '8,16,') is refused."""
    try:
        words = [part.split() or [""] for part in text.split(",")]  # an empty entry is refused by int("")
        return [int(v) for part in words for v in part]
    except ValueError:
        raise EdtoolError(f"{what} must be integers separated by commas, e.g. 32,64,128 (got {text!r})") from None


def name_list(text: str) -> List[str]:
    """--models unet,els / --machine els-borders,is -> the names, in order."""
    return [m.strip() for m in text.split(",") if m.strip()]


def option(settings, name: str, *flags, **kw):
    """An option whose default is the settings dataclass's (a list shown as 3,5,7) and whose range is
    edtool.config.RANGES' (Typer refuses a number outside as a usage error, before any work), so the
    command and the library agree (`default=` overrides the default, as demo's shorter tour does)."""
    value = kw.pop("default") if "default" in kw else default(settings, name)
    if isinstance(value, list):
        value = ",".join(map(str, value))
    least, most = RANGES.get(name, (None, None))
    if name in ("dataset", "held_out"):
        kw.setdefault("callback", dataset_option)
    return typer.Option(value, *flags, **{"min": least, "max": most, **kw})


# An option of one command's settings: compute_option("nsteps", help=...) is ComputeConfig.nsteps' option.
compute_option = partial(option, ComputeConfig)
train_option = partial(option, TrainConfig)
calibrate_option = partial(option, CalibrateConfig)
sample_option = partial(option, SampleConfig)


def dataset_option(text: Optional[str]) -> Optional[str]:
    """--dataset MNIST is mnist (edtool.data.dataset_name), before a command uses it (analyze names its
    folder after it)."""
    from edtool.data import dataset_name

    return dataset_name(text)


def settings_from(settings, params: dict, **given):
    """The settings dataclass from a command's parameters of the same names (and `given`), not yet checked: the
    library function the command calls checks it (compute, train), or the command does before its first use."""
    return settings(**{**{k: v for k, v in params.items() if k in settings.__dataclass_fields__}, **given})


def given_on_command_line(ctx: typer.Context) -> set:
    """The names of the parameters the user gave (not left at their defaults)."""
    return {k for k in ctx.params if ctx.get_parameter_source(k).name == "COMMANDLINE"}  # typer vendors click


def command_line() -> str:
    """This process's command as the user could type it again (recorded with what it writes)."""
    return "edtool " + " ".join(shlex.quote(a) for a in sys.argv[1:])
