"""The one exception type for problems the user can fix: bad config, bad data, wrong model.

The CLI prints its lines and exits with status 2; the server answers 4xx. Anything else
that escapes is a bug in mlx_surgical and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input. Each entry of `problems` is one self-contained line
    naming the file, line or field and how to fix it."""

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))
