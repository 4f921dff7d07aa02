"""The one exception type a user can cause.

Tasks turn it into one line on stderr and a non-zero exit; anything else is a
bug and may traceback.
"""


class UgroError(Exception):
    """A problem the user can fix: bad config, bad input, an unhealthy node."""

    exit_code = 1
