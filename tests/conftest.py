"""Shared fixtures: float64 for identity checks (enabled per test, never globally) and tiny models."""
import jax
import pytest


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled (``jax.enable_x64`` context)."""
    with jax.enable_x64(True):
        yield
