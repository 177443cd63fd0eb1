"""The project's own error for bad input: a params value, a file, a field or a request that
the message names. The CLI prints it as one line; any other exception (a bug here, or in Keras
or numpy, which raise ValueError too) prints its traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, named in the message; what to change is said there too."""
