"""The one error type for the user's mistakes."""


class UsageError(Exception):
    """Bad input from the user: a file, array, node or option that is not what was expected.

    The message is one line that names the culprit and what was expected. The CLI turns
    it into exit status 2 without a traceback; anything else is a bug and keeps its
    traceback.
    """
