"""The one error every command shows as a one-line message."""


class UsageError(ValueError):
    """A mistake in how a command was called, or an output it must not touch; its message
    is shown as is (`error: ...`, exit code 2)."""
