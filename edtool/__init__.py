"""edtool: the exterior derivative (non-conservativeness) of diffusion score fields."""

__version__ = "0.1.0"
