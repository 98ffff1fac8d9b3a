import os

import torch

# the kernels are timed on CUDA only; elsewhere they would need the (slow) interpreter
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the accelerator in --benchmark-json, so results say which card gave them."""
    machine_info["torch"] = torch.__version__
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
