"""User-facing errors: the CLIs print these as one line and exit non-zero, without a traceback."""


class UserError(Exception):
    """Bad input from the user (missing file, bad image, wrong shape, unknown config key...)."""


def first_line(e: BaseException) -> str:
    """``ExceptionName: first non-empty line of its message``: a library error as part of one error line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    line = lines[0] if len(lines[0]) <= 160 else lines[0][:160] + "…"
    return f"{type(e).__name__}: {line}"
