"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class InputError(Exception):
    """Bad input or environment (missing source, unwritable destination, mismatched store, ...)."""
