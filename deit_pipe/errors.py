"""The errors users see: the CLI prints the message on one line and exits with the error's code."""


class InputError(Exception):
    """The user's input: a missing source, a mismatched store, a bad flag, an unwritable destination (exit 2)."""

    exit_code = 2


RERUN = "rerun with the same arguments (committed work is kept)"


class EnvironmentFault(Exception):
    """The machine or the service, not the input: a full disk, an object store failing past its retries (exit 3).

    `rerun` tells the user what resumes the work (None: nothing to resume); the CLI prints it after the message.
    A stage whose rerun needs more than the same arguments says so on the way out (train: --resume). A fault
    raised in a loader worker arrives rebuilt from its message, with the default."""

    exit_code = 3

    def __init__(self, message: str, rerun: str | None = RERUN):
        super().__init__(message)
        self.rerun = rerun
