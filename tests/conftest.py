import os

import pytest
import torch

# the suite runs on 2 cores next to nothing else; keep torch from oversubscribing
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
