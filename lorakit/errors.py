"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class LorakitError(Exception):
    """A problem with the user's input (recipe, files, arguments). ``exit_code`` is the CLI status."""

    exit_code = 1


class RecipeError(LorakitError):
    """A recipe that does not validate. Raised before any model loads; the CLI exits with status 2."""

    exit_code = 2


class ArgumentError(LorakitError):
    """A bad command-line argument: a value the option does not take, or options that do not go together.
    The CLI exits with status 2, as for a bad recipe."""

    exit_code = 2


class Interrupted(LorakitError):
    """Training stopped by a signal (Ctrl-C, SIGTERM): the message says where and how to resume. The CLI
    prints it without "error:" and exits with ``exit_code`` = 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
