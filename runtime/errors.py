"""Two kinds of errors: `EdgeAdaptError` for what a user can cause (one line: what, why, what to do) and
`InternalError` for bugs. The CLI prints the first as one line with a non-zero exit code."""


class EdgeAdaptError(Exception):
    """A problem the user can fix. The message is one line: what happened, why, what to do."""

    exit_code = 2


class UnknownNameError(EdgeAdaptError):
    """An unknown backbone, preset, loss, optimizer, label, profile or format."""


class ConfigError(EdgeAdaptError):
    """Arguments that do not fit together (e.g. fewer than 2 classes, a pattern that matches nothing)."""


class WeightsError(EdgeAdaptError):
    """A weight file that cannot be found or whose sha256 does not match."""


class BundleError(EdgeAdaptError):
    """A bundle that is missing, incomplete, tampered with, or of an unknown schema."""


class DataError(EdgeAdaptError):
    """Local data that cannot be used: empty, wrong shape, NaN/inf, unknown labels, too many unreadable files."""


class ExportError(EdgeAdaptError):
    """A model that cannot be exported as asked (e.g. an op without a gradient on the trainable path)."""


class TrainingError(EdgeAdaptError):
    """Training that cannot go on (loss diverged twice, checkpoint cannot be written, bundle locked)."""


class BackendError(EdgeAdaptError):
    """An execution backend or device that is not available here (CUDA, OpenVINO GPU/NPU)."""


class InternalError(Exception):
    """A bug in edgeadapt: please report it with the traceback."""
