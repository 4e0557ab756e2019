"""The one exception type the benchmark raises for user errors (bad option, missing data)."""


class BenchError(Exception):
    """A problem the user can fix; the CLI prints its message on one line and exits with code 2."""
