"""The error a user can fix: one clear line naming the file, line, field or tensor.

Everything tinylora rejects because of its input (a bad path, a malformed
file, a config value it cannot honour, an adapter that does not fit) raises
`TinyloraError`. The CLI prints it as one line and exits with status 2;
anything else is a bug and keeps its traceback. It subclasses ValueError so
code that already catches ValueError keeps working.
"""


class TinyloraError(ValueError):
    """Bad input: the message says what, where, and (when it can) how to fix it."""
