"""Errors the command line turns into exit codes (2: bad input, 1: bound not met)."""


class InputError(ValueError):
    """The model, an option or a data file is unusable; the message names the problem in one line."""


class BoundNotMet(RuntimeError):
    """No factorization keeps the error within the requested bound; nothing was written."""
