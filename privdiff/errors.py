"""The one error type users see: a one-line message naming the offending file or value."""


class PrivdiffError(ValueError):
    """Bad input or a refused operation; the message is a single line meant for the user."""


class ReportedElsewhere(PrivdiffError):
    """A failure another process reports (rank 0 of a distributed release): this one ends quietly."""
