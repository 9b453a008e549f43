"""Shared fixtures: float64 for identity checks (enabled per test, never globally), jax's compilation cache,
and the quick-settings evidence of the paper's claims (run once per test module)."""
import jax
import pytest


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled (``jax.enable_x64`` context)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """jax's persistent compilation cache for a module's runs (use it with
    ``pytestmark = pytest.mark.usefixtures('compilation_cache')``): every run here compiles the same tiny
    model, and a cache hit gives the same executable (so the same bits) in a fraction of the time.
    Restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {name: getattr(jax.config, name) for name in names}
    cache = tmp_path_factory.getbasetemp() / "jax-cache"  # shared by the modules that use this fixture
    cache.mkdir(exist_ok=True)
    new = (str(cache), 0, 0)
    for name, value in zip(names, new):
        jax.config.update(name, value)
    cc.reset_cache()
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(scope="module")
def evidence():
    """``claim id -> list[Evidence]`` of the claim's quick settings, each claim run once per module (via
    :func:`proofs_check.claims.run`); a check that leaves ``jax_enable_x64`` changed fails."""
    from proofs_check import claims

    registry = claims.load_all()
    cache: dict = {}
    x64_before = jax.config.jax_enable_x64

    def get(cid: str) -> list:
        if cid not in cache:
            cache[cid] = claims.run(registry[cid], quick=True).evidence
            assert jax.config.jax_enable_x64 == x64_before, f"{cid} left jax_enable_x64 changed"
        return cache[cid]

    return get
