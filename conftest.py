import os

import torch

# Triton kernels run under the interpreter on machines without a GPU (set before triton is
# imported); serves tests/ and bench/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
