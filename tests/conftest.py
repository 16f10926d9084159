"""Fixtures shared by the test files."""

import pytest

from mnn import jit


@pytest.fixture(params=["numpy", "jit"])
def compute_path(request):
    """Run a test once on the pure-numpy code and once on the compiled loops of mnn.jit (numba: a test extra)."""
    previous = jit.set_enabled(request.param == "jit")
    try:
        assert jit.enabled() == (request.param == "jit"), "numba is a test dependency: the compiled path must run"
        yield request.param
    finally:
        jit.set_enabled(previous)
