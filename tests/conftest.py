import pytest
import torch


@pytest.fixture()
def one_thread():
    """Tiny models run faster on one thread on a shared machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
