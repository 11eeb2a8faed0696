"""lprnet-edge: LPRNet licence plate recognition, compiled with Apache TVM for edge devices.

Importing this package (and ``Recognizer``) needs only numpy and OpenCV: the host toolchain
(torch, the TVM compiler, paramiko) is imported lazily by the modules that need it.
"""

from lprnet_edge.errors import LprnetEdgeError
from lprnet_edge.recognizer import PlateResult, Recognizer

__version__ = "0.1.0"

__all__ = ["LprnetEdgeError", "PlateResult", "Recognizer", "__version__"]
