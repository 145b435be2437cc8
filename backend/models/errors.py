"""The model package's error, in a module of its own: naming it loads no PyTorch."""


class ModelError(ValueError):
    """A model cannot be built, loaded, saved or exported; the message says what to do."""
