import torch

# (the Triton interpreter setting for machines without a GPU is in the repository's conftest.py)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the accelerator in --benchmark-json, so results say which card gave them."""
    machine_info["torch"] = torch.__version__
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Keep the summary statistics, not every round's time: a GPU kernel runs thousands of rounds
    (the H200's op table was 8.9 MB with them); bench-report reads the mean only."""
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)
