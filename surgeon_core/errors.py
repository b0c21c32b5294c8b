"""Errors raised by surgeon_core; messages name the component, the numbers, and a next step."""


class SurgeonError(Exception):
    """Base class of every error surgeon_core raises on purpose."""


class BudgetExceeded(SurgeonError):
    """The activation cache cannot fit the byte budget, even with every keep ratio at its floor."""

    def __init__(self, budget_bytes: int, floor_bytes: int, message: str = ""):
        self.budget_bytes = int(budget_bytes)
        self.floor_bytes = int(floor_bytes)
        super().__init__(message or (
            "activation cache needs %.2f MB at the keep-ratio floor but the budget is %.2f MB; "
            "lower keep_floor, shrink the batch, or raise budget_mb"
            % (floor_bytes / 2**20, budget_bytes / 2**20)))


class CaptureError(SurgeonError):
    """The capture layer was used in a way that would lose its accounting."""


class IncompatibleModel(SurgeonError):
    """A checkpoint or weights file does not match the model it is loaded into."""


class DataNotFound(SurgeonError):
    """A data set or weights file is not where the settings say it is."""


def internal_assert(condition: bool, message: str) -> None:
    """Check an invariant of surgeon_core itself (never user input); survives ``python -O``."""
    if not condition:
        raise AssertionError("surgeon internal error: " + message)
