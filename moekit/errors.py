"""moekit's user-facing errors.

Every problem with what a user gave (a file, a field, a flag, an argument) raises a
:class:`MoekitError` whose message names it; the command line prints those as one line.
Anything else is a bug and keeps its traceback. ``MoekitError`` is a ``ValueError``, so
existing ``except ValueError`` code keeps working.
"""


class MoekitError(ValueError):
    """Bad input; the message names the file, field, flag or argument."""
