"""The errors a run reports as one line (the launcher prints the message and exits with status 2)."""


class TrainingError(RuntimeError):
    """A run cannot start or continue; reported by the launcher as one line, exit 2."""


class DataError(ValueError):
    """A problem with the data configuration or files; the message is one line naming the key."""
