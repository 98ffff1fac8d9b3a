import torch

# (the Triton interpreter setting for machines without a GPU is in the repository's conftest.py)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the accelerator in --benchmark-json, so results say which card gave them."""
    machine_info["torch"] = torch.__version__
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
