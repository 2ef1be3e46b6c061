"""The errors users see: the CLI prints the message on one line and exits with the error's code."""


class InputError(Exception):
    """The user's input: a missing source, a mismatched store, a bad flag, an unwritable destination (exit 2)."""

    exit_code = 2


class EnvironmentFault(Exception):
    """The machine or the service, not the input: a full disk, an object store failing past its retries (exit 3).
    Committed work is kept: a rerun with the same arguments resumes."""

    exit_code = 3
