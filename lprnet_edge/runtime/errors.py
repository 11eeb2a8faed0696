"""One root exception type: the CLI maps it to ``Error: ...`` and a non-zero exit code."""


class LprnetEdgeError(Exception):
    """A problem the user can fix (bad input, missing file, unreachable device...)."""

    exit_code = 1


class DataError(LprnetEdgeError):
    """An image or label that cannot be used."""

    exit_code = 3


class WeightsError(LprnetEdgeError):
    """Missing, corrupt or incompatible model weights."""

    exit_code = 4


class ArtifactError(LprnetEdgeError):
    """An artifact that is missing, tampered with, or built for another machine."""

    exit_code = 5


class ToolchainError(LprnetEdgeError):
    """A missing cross compiler or TVM component."""

    exit_code = 6


class DeviceError(LprnetEdgeError):
    """A device that cannot be reached or fails during deployment."""

    exit_code = 7
