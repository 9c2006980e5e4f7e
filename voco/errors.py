"""The one exception type that means "the user gave us something we cannot use"."""


class VocoInputError(Exception):
    """Bad input: the CLI prints the message as one line and exits with code 2.

    Messages name the file (when there is one) and the problem: ``"scan.nii.gz: not 3-D (shape 64x64)"``.
    """

    def __init__(self, message: str, path=None):
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = path


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, short enough for a one-line report (a library's
    error often goes on for pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."
