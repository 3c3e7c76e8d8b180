"""The one exception type users see: its message is printed as a single line by the CLI."""


class PirlError(Exception):
    """A problem with the user's input or environment (bad path, bad config value, corrupt file).

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback.
    """


class WriteError(PirlError):
    """Writing a result failed (disk full, I/O error); the earlier files are intact. The CLI exits with status 1."""

    exit_status = 1
