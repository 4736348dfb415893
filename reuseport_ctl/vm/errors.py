"""The VM runner's error: one sentence, and an exit status that tells a
runner failure apart from the guest command's own (which is passed through)."""
from __future__ import annotations

from ..errors import UserError

# Exit statuses of the runner itself (the guest command's status otherwise):
EXIT_VM = 125        # the VM could not be set up or booted (like git bisect's "skip")
EXIT_TIMEOUT = 124   # like timeout(1)
EXIT_INTERRUPTED = 130
EXIT_OUTPUT_LOST = 123  # the guest's output did not all arrive (or could not be vouched for)


class VMError(UserError):
    def __init__(self, message: str, exit_code: int = EXIT_VM):
        super().__init__(message, exit_code)
