"""The one error type for the user's mistakes, and one-line messages from library errors."""

import contextlib
import errno
import tempfile
from collections.abc import Iterator

# What a full disk or an exhausted quota raises.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UsageError(Exception):
    """Bad input from the user: a file, array, node or option that is not what was expected.

    The message is one line that names the culprit and what was expected. The CLI turns
    it into exit status 2 without a traceback; anything else is a bug and keeps its
    traceback.
    """


def one_line(err: BaseException, limit: int = 200) -> str:
    """The error on one line; a long one keeps its start and its end, where libraries put
    the verdict after the paths (e.g. "... '../x.data' points outside the directory")."""
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) <= limit:
        return text
    head = limit * 3 // 5
    return text[:head] + " ... " + text[-(limit - head - 5) :]


class OutputExistsError(UsageError):
    """The output file exists and overwriting was not asked for. The message names the
    API's `force=True`; the CLI names its `--force` instead."""

    def __init__(self, path: object) -> None:
        super().__init__(f"{path}: already exists; pass force=True to overwrite it")
        self.path = path


@contextlib.contextmanager
def temporary_space() -> Iterator[None]:
    """A full disk under the temporary folder while the work inside writes there (taps, tap
    sessions, spilled sums, grouped statistics) ends in one line that names the folder and
    how to move it, instead of a traceback."""
    try:
        yield
    except OSError as err:
        if err.errno not in _NO_SPACE:
            raise
        folder = tempfile.gettempdir()
        raise UsageError(
            f"temporary files in {folder}: {err.strerror or err}; "
            "set TMPDIR to a folder with more room"
        ) from err
