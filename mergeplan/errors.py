"""User-facing errors: each becomes one line on stderr and a non-zero exit in the CLI."""


class MergeplanError(Exception):
    """Bad input or a failed check the user can act on.

    The message is the whole story: what is wrong, where, and what to do.
    The CLI prints it as a single line (no traceback unless MERGEPLAN_TRACEBACK=1).
    """

    exit_code = 2


class PlanFormatError(MergeplanError):
    """A plan file that is truncated, corrupt, or from a newer mergeplan."""


class InputMismatchError(MergeplanError):
    """Input models on disk differ from what the plan recorded."""
