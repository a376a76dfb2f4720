"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class LorakitError(Exception):
    """A problem with the user's input (recipe, files, arguments). ``exit_code`` is the CLI status."""

    exit_code = 1


class RecipeError(LorakitError):
    """A recipe that does not validate. Raised before any model loads; the CLI exits with status 2."""

    exit_code = 2
