"""The one exception type for errors a user can cause (bad config, bad data row, unknown environment).

The CLI prints it as one line and exits with code 2; bugs still raise normally.
"""


class UsageError(Exception):
    """An error the user caused and can fix: printed as one line (naming the field, file or line), exit code 2."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a non-finite loss; the run stopped with its last checkpoint intact.

    The CLI prints it as one line and exits with code 1 (the data or the hyperparameters are at fault, not the call).
    """
