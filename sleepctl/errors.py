"""Errors the CLI maps to one line and an exit code (STYLE.md: 0 ok, 1 runtime, 2 usage, 130 interrupted)."""

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the lock; cron may simply try again later
EXIT_INTERRUPTED = 130


class SleepError(Exception):
    """A failure the user can act on; `hint` says how."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(SleepError):
    """Bad input: a flag, a file, a recipe value."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    pass


class InputError(UsageError):
    pass


class ModelError(SleepError):
    pass


class StoreError(SleepError):
    pass


class LockedError(SleepError):
    exit_code = EXIT_LOCKED
