import os
import sys

import torch

# Triton kernels run under the interpreter on machines without a GPU (set before triton is
# imported); serves tests/ and bench/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The repository root's folders (kernels/, engine/, ...) are the installed package `stemgen`'s
# subpackages, not top-level modules: with the root on sys.path, `kernels` would shadow the
# `kernels` package that transformers probes for. Tests import the project as `stemgen` only.
# `stemgen` is imported first: from a source tree (PYTHONPATH=<repo>, bench/gpu_run.sh) it finds its
# subpackages through its own __path__ from then on.
import stemgen  # noqa: E402,F401

_root = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
