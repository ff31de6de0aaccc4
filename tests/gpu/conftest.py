import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="GPU tests: no CUDA device on this machine")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
