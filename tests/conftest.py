import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_rank_group():
    """A world of one gloo rank over an in-memory store (no socket), megatron state torn down
    after the module."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from distca.bootstrap import start_process_group
    from distca.config import DistBackend

    start_process_group(DistBackend.gloo, 0, 1, None, interface="lo")
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process_group():
    """Tear down the one-process gloo group and megatron state that a module's tests created."""
    yield
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def cpp_extension():
    """The C++ kernel built at install (distca._C). It skips only where the machine has no C++
    compiler: a kernel missing or stale where one could be built fails the tests."""
    from distca.attention import cpp_backend

    if cpp_backend.is_available():
        return
    if cpp_backend.has_compiler():
        pytest.fail(f"cpp backend: {cpp_backend.unavailable_reason()}")
    pytest.skip(f"cpp backend unavailable: {cpp_backend.unavailable_reason()}")
