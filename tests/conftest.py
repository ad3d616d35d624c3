import pytest
import torch


def _single_thread():
    """Tiny models run faster on one thread on a shared machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


one_thread = pytest.fixture(_single_thread, name="one_thread")
# For a whole module, before its module-scoped fixtures compute reference outputs (the cached runs must
# see the same thread count): ``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``.
one_thread_per_module = pytest.fixture(_single_thread, scope="module", name="one_thread_per_module")
