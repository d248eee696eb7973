import platform

import torch

from safesteer import __version__
from safesteer.software import software


def test_the_record_names_the_releases_and_the_thread_count_in_use() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        record = software()
    finally:
        torch.set_num_threads(threads)
    assert record["torch_threads"] == 1
    assert record["python"] == platform.python_version() and record["safesteer"] == __version__
    assert record["torch"] == torch.__version__
    assert set(record) == {"python", "safesteer", "torch", "transformers", "peft", "accelerate",
                           "torch_threads"}
