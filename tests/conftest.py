import logging
import os
from collections.abc import Iterator

import pytest
import torch

# Small, repeatable CPU work in tests: two cores on CI.
torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_logging_and_threads() -> Iterator[None]:
    # `detector.cli.main` points the root logger at the current sys.stderr (capsys's), sets its
    # level, and may set torch's thread count (scoring.threads); put them back after every
    # test, so no test's setup leaks into the next.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threads = torch.get_num_threads()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    torch.set_num_threads(threads)
