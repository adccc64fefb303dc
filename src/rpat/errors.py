"""Exceptions shared across the package."""


class InputError(ValueError):
    """A user-facing input problem.

    The CLI prints its message on one line and exits with status 2; the Python
    API raises it as is.
    """
