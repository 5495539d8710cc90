"""The one user-error type.

Anything a user can cause (a bad file, a bad flag, a missing model) raises HabitError with a
message that names the file, row/line and field where that applies. The CLI prints it as one
line and exits with code 2; library callers can catch it.
"""


class HabitError(Exception):
    """A problem with the user's input or environment, not a bug in habit."""


class Interrupted(HabitError):
    """Training stopped on request (Ctrl-C / SIGTERM) after saving a checkpoint; exit code 130."""
