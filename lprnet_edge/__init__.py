"""lprnet-edge: LPRNet licence plate recognition, compiled with Apache TVM for edge devices.

The public face is the on-device runtime (``Recognizer``, ``Artifact``, the errors): importing
it needs only numpy and OpenCV. This file imports nothing but :mod:`lprnet_edge.runtime`, so it
ships to a board beside that folder and ``from lprnet_edge import Recognizer`` works there.
"""

from lprnet_edge.runtime import __version__
from lprnet_edge.runtime.artifact import Artifact
from lprnet_edge.runtime.errors import LprnetEdgeError
from lprnet_edge.runtime.recognizer import PlateResult, Recognizer

__all__ = ["Artifact", "LprnetEdgeError", "PlateResult", "Recognizer", "__version__"]
