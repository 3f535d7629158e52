import os

import pytest
import torch

# Small tensors: extra threads only add contention on CI's 2 cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seed():
    """A fresh seed per test run, printed so a failure can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    print(f"seed={s}")
    torch.manual_seed(s)
    return s
