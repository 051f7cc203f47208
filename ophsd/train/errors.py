"""The trainer's own error."""


class TrainingError(RuntimeError):
    """The run cannot continue (a whole batch failed repeatedly, ...); a checkpoint was attempted."""
