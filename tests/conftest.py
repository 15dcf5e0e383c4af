import pytest

from tiny import register_tiny_shapes


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """Registers the tiny shapes splits (generated once per session) and returns their root."""
    root = tmp_path_factory.mktemp("datasets")
    register_tiny_shapes(str(root))
    return root
