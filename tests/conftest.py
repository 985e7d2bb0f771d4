"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one thread than on two on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ci_zoo(tmp_path_factory):
    """The CI-size toy zoo, built once per test session through `python -m toy_zoo build`
    (about a minute); test_toy_zoo checks it and test_study runs the quick study on it."""
    from toy_zoo import __main__ as cli

    out = tmp_path_factory.getbasetemp() / "ci_zoo"
    assert cli.main(["build", "--out", str(out), "--preset", "ci"]) == 0
    return out


@pytest.fixture
def numpy_masks(monkeypatch):
    """DARE's masks by numpy, as on a machine where the compiled kernel is not available
    (AIM_MERGING_KERNELS=0; the process's choice is made again after the test)."""
    from merging_methods import dare_kernel

    monkeypatch.setenv(dare_kernel.SWITCH, "0")
    dare_kernel._load.cache_clear()
    yield
    dare_kernel._load.cache_clear()
