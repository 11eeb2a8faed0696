"""The package's exception tree (defined in :mod:`lprnet_edge.runtime.errors`, which ships to
the board): one root type, mapped by the CLI to ``Error: ...`` and a non-zero exit code."""

from lprnet_edge.runtime.errors import (
    ArtifactError,
    DataError,
    DeviceError,
    LprnetEdgeError,
    ToolchainError,
    WeightsError,
)

__all__ = ["ArtifactError", "DataError", "DeviceError", "LprnetEdgeError", "ToolchainError",
           "WeightsError"]
