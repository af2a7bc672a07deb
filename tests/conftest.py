import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two worker processes on a two-core machine
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Some test modules run many tiny models on a shared 2-core machine: one thread each is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
