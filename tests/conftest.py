import os

import pytest
import torch

# Small, repeatable CPU work in tests: two cores on CI.
torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
