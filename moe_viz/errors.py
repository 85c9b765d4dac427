"""The error moe_viz raises for a problem the user can fix (bad input, an unsupported model, a broken
checkpoint): the CLI and the dashboard show its one-line message instead of a traceback.
"""


class MoeVizError(Exception):
    """A user-facing error: its message is one line that says what to do."""
