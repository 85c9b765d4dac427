import os

import pytest
import torch

# Torch's default 2 threads are several times slower than 1 on the 2-core CI machines.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "store.duckdb"
