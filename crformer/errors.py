"""User-facing errors: the CLIs print these as one line and exit non-zero, without a traceback."""


class UserError(Exception):
    """Bad input from the user (missing file, bad image, wrong shape, unknown config key...)."""
