"""What edtool asks of a score model: the `ScoreModel` interface, and `ScoreField`, a model at one time.

Every source of scores satisfies `ScoreModel` and says so by subclassing it: edtool's networks and
the paper's (`edtool.networks.models.Network`), diffusers models (`networks.diffusers_source.DiscreteVPModel`),
`py:` entry points (`networks.entry_point.EntryPointModel`) and the ELS machines (`els.machine.Machine`).
The sampler calls `eps`; the estimators take `field(t, label)`, a function of x alone; `prepare` reads
`name`, `conditional` and `manifest`. A new source implements these and nothing else (docs/models.md):

    class MyModel(ScoreModel):
        name, conditional = "mine", False
        manifest = {"arch": "mine", "image_shape": [1, 28, 28], "padding": "zeros", "num_classes": None}
        def eps(self, t, x, label=None): ...          # eps_hat at edtool's t (B,), x (B, C, H, W)
        def score(self, t, x, label=None): ...        # -eps_hat / sqrt(beta(t))
        def to(self, device=None, dtype=None): ...    # move the weights; returns self

    f = MyModel().field(t)        # ScoreField: f(x) == model.score(t, x); f.closed_form(x) is None

A field that knows its Jacobian in closed form (the ELS machines) returns it from `closed_form(x)` as a
`ClosedForm`; the estimators then take the exact numbers from it instead of differentiating by autograd,
and the sampler takes the score that came with it instead of evaluating the model a second time.
"""

from abc import ABC, abstractmethod
from typing import NamedTuple, Optional, Protocol

from torch import Tensor


class ClosedForm(NamedTuple):
    """A field's exact Jacobian at a batch x (B, C, H, W), as its closed form gives it."""

    jacobian: Tensor  # a band (B, C, H, W, C, k, k) (local machines, SPEC 5.3) or dense (B, n, n) (`is`)
    padding: str  # where a band's windows leave the image: "zeros" (cut off) or "circular" (wrap around)
    score: Optional[Tensor]  # s(t, x) (B, C, H, W) when the same sums gave it, else None


class ScoreField(ABC):
    """A score model at one time t (and label): x (B, C, H, W) -> s(t, x), sample by sample.

    `closed_form(x)` is the field's exact Jacobian at x, or None when it has none (the estimators then
    use autograd). Any plain callable x -> s(x) is also accepted where a field is: it has no closed form."""

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """The score at every sample of x."""

    def closed_form(self, x: Tensor) -> Optional[ClosedForm]:
        """The exact Jacobian at x (with the score, where the same computation gives it), or None."""
        return None


class ModelField(ScoreField):
    """`model.score(t, x, label)` as a function of x: the field of a model without a closed form."""

    def __init__(self, model: "ScoreModel", t, label: Optional[Tensor] = None):
        self.model, self.t, self.label = model, t, label

    def __call__(self, x: Tensor) -> Tensor:
        return self.model.score(self.t, x, self.label)


class ScoreModel(Protocol):
    """A diffusion score model at edtool's time t in [0, 1] (SPEC 2), for a batch x (B, C, H, W).

    - `name`: what the model is (its architecture or machine name), for messages and records.
    - `conditional`: whether it takes a class label: a conditional model is given one (B,) int64
      label per sample, an unconditional one label=None.
    - `manifest`: {"arch", "image_shape" [C, H, W] (None when it follows the data), "padding"
      ("zeros" or "circular": how --locality measures distance, which machine `els` means),
      "num_classes" (None when unconditional)}; sources may add keys of their own.
    - `eps(t, x, label)`: the noise prediction eps_hat, what DDIM takes; t a float or (B,) float64.
    - `score(t, x, label)`: s = -eps_hat / sqrt(beta(t)) = -eps_hat / sqrt(1 - alpha_bar(t)).
    - `to(device, dtype)`: move the model (weights, training images) and return it.
    - `field(t, label)`: the `ScoreField` x -> s(t, x); by default without a closed form.
    """

    name: str
    conditional: bool
    manifest: dict

    def eps(self, t, x: Tensor, label: Optional[Tensor] = None) -> Tensor: ...

    def score(self, t, x: Tensor, label: Optional[Tensor] = None) -> Tensor: ...

    def to(self, device=None, dtype=None) -> "ScoreModel": ...

    def field(self, t, label: Optional[Tensor] = None) -> ScoreField:
        """The score at time t (and label) as a function of x alone."""
        return ModelField(self, t, label)


MANIFEST_KEYS = ("arch", "image_shape", "padding", "num_classes")  # what every ScoreModel's manifest holds
