"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: a flag, a config value, a path, a tracking URI.

    The message is shown to the user as is, on one line, so it should name the fix.
    """
