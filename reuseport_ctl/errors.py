"""The one error type the CLI turns into a single sentence and exit code 1."""


class UserError(Exception):
    """Something the user can fix; its message is one clear sentence."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
