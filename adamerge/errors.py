"""One exception type for bad user input: the CLI prints its message as one line and exits non-zero."""


class AdamergeError(ValueError):
    """Raised for input a user can fix (paths, configs, mismatched experts, data)."""
