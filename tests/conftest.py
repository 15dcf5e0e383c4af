import pytest

from tiny import register_tiny_shapes


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """Registers the tiny shapes splits (generated once per session) and returns their root."""
    root = tmp_path_factory.mktemp("datasets")
    register_tiny_shapes(str(root))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (they gain nothing from two, and when
    another process holds a core, two OpenMP threads wait on each other). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
