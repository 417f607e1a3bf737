"""Expected failures: bad input a user can fix. The CLIs print these as one line."""


class PipelineError(Exception):
    """Base of every error caused by input rather than by a bug."""


class SlideError(PipelineError):
    """A slide cannot be opened or read, or its metadata is unusable."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class SheetError(PipelineError):
    """The slide sheet (CSV) is malformed."""


class OutputError(PipelineError):
    """An output cannot be written (disk full, permission denied, ...)."""
