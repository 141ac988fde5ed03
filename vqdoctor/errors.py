"""One exception family. The CLI maps every `VQDoctorError` to exit code 2 and one line on stderr."""

from __future__ import annotations


class VQDoctorError(Exception):
    """Base class: vqdoctor could not analyse its input.

    Args:
        message: what is wrong, one line, no trailing period needed.
        path: the file or directory concerned, shown first when given.
        hint: what the user can do about it.
    """

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        self.message = message
        self.path = path
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())  # always one line


class InputError(VQDoctorError):
    """A path or argument cannot be used (missing, unreadable, wrong kind)."""


class CheckpointError(InputError):
    """A checkpoint file cannot be read safely (corrupt, empty, wrong format)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint needs globals that a weights-only load refuses to build.

    Attributes:
        globals: the fully qualified names the file asks for.
    """

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None,
                 globals: list[str] | None = None):
        self.globals = list(globals or [])
        super().__init__(message, path=path, hint=hint)


class MemoryBudgetError(InputError):
    """Reading an input would take more memory than the budget allows (`--max-memory`).

    Attributes:
        needed: bytes the read would allocate.
        budget: the budget it was checked against, in bytes.
    """

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None,
                 needed: int = 0, budget: int = 0):
        self.needed, self.budget = int(needed), int(budget)
        super().__init__(message, path=path, hint=hint)


class NoQuantizerError(VQDoctorError):
    """No quantizer was found in a checkpoint or model."""


class ProbeError(InputError):
    """A probe tensor file does not fit the quantizer it is meant for."""


class ConfigError(VQDoctorError):
    """Invalid option or configuration value."""


class RunStoreError(InputError):
    """A run directory cannot be read."""
