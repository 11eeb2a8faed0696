"""The on-device runtime: the only part of lprnet-edge that ships to a board.

It needs numpy, OpenCV and the TVM runtime, and imports nothing from the rest of the package
(``tests/runtime/test_isolation.py`` checks both), so ``deploy`` uploads this folder alone.
"""

__version__ = "0.1.0"
