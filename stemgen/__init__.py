"""StemGen engine: fast inference for StemGen-style stem generation.

Packages: stemgen.engine (inference), stemgen.kernels (hot-path ops), stemgen.weights_convert
(checkpoint converters), stemgen.train (training-form reference model), stemgen.cli (CLI).
"""
import os as _os

__version__ = "0.1.0"

# Running from a source checkout (PYTHONPATH=<repo>) rather than an install: the subpackages
# live in top-level folders (engine/, kernels/, ...) that pyproject maps to stemgen.*.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "engine")):
    __path__.append(_root)  # noqa: F821 (package __path__)
