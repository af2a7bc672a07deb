import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Some test modules run many tiny models on a shared 2-core machine: one thread each is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
