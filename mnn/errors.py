"""The library's own error types: everything mnn refuses, it refuses with one of these."""


class MnnError(Exception):
    """Base class of every error mnn raises on purpose."""


class ShapeError(MnnError, ValueError):
    """An array of the wrong rank, shape or dtype reached a layer or loss."""


class DataError(MnnError, ValueError):
    """A dataset file is missing, truncated, corrupted or of the wrong kind."""


class CheckpointError(MnnError, ValueError):
    """A weights or checkpoint file cannot be loaded into this model."""


class TrainingError(MnnError, RuntimeError):
    """Training cannot go on (for example, the loss became NaN or infinite)."""


class InputError(MnnError, ValueError):
    """An input has the right shape but impossible values (label out of range, NaN, log of 0)."""
