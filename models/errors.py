"""The one error type of the model layer (kept free of the `kd` package, which imports this one)."""


class ModelError(ValueError):
    """A model name, weights file or image size that cannot work. The command line prints it as one
    line and exits with code 2, like every other bad input."""
