"""The Jacobian of a score field: the exterior derivative (exact, Hutchinson) and its locality."""
