"""Tests of proofs_check.runtime: the persistent compilation cache, compile/run timing, progress lines."""
import io

import jax
import jax.numpy as jnp
import pytest

from proofs_check import __main__ as cli
from proofs_check import evidence as E
from proofs_check import report as R
from proofs_check import runtime as RT
from proofs_check.claims import Claim


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert RT.default_cache_dir() == tmp_path / "rate_tuning" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert RT.default_cache_dir().parts[-3:] == (".cache", "rate_tuning", "jax")


def test_cache_is_written_then_read_back_and_settings_restored(tmp_path):
    before = {n: getattr(jax.config, n) for n in ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
                                                  "jax_persistent_cache_min_compile_time_secs")}
    x = jnp.arange(7.0)

    def program():  # a fresh function each time, so only the persistent cache can serve the second
        return jax.jit(lambda v: jnp.sin(v) * 3.25 + jnp.cumsum(v))

    with RT.compilation_cache(tmp_path / "c"), RT.CompileClock() as first:
        a = program()(x)
    assert first.programs == 1 and first.cache_hits == 0 and any((tmp_path / "c").iterdir())
    with RT.compilation_cache(tmp_path / "c"), RT.CompileClock() as second:
        b = program()(x)
    assert second.programs == 1 and second.cache_hits == 1
    assert bool(jnp.all(a == b))
    assert {n: getattr(jax.config, n) for n in before} == before
    with RT.compilation_cache(None), RT.CompileClock() as off:
        program()(x)
    assert off.programs == 1 and off.cache_hits == 0


def test_clock_splits_wall_into_compile_and_run():
    x = jnp.ones((4, 3)).block_until_ready()
    with RT.CompileClock() as t:
        jax.jit(lambda v: v @ v.T + 1.5)(x).block_until_ready()
    assert t.programs == 1 and t.trace > 0 and t.compile > 0
    assert t.compile_total <= t.wall + 1e-6 and t.run == pytest.approx(t.wall - t.compile_total, abs=1e-9)
    d = t.to_dict()
    assert {"wall", "trace", "lower", "compile", "compile_total", "run", "programs", "cache_hits"} <= set(d)


def test_progress_lines_and_estimate():
    out = io.StringIO()
    p = RT.Progress(["A", "B", "C"], previous={"A": (2.0, 3), "B": (4.0, 1), "C": (6.0, 2)}, stream=out)
    assert not p.bar  # a StringIO is no terminal: no tqdm bar
    assert p.left() == pytest.approx(12.0)
    with p.claim("A"):
        pass
    with p.claim("B"):
        pass
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/3] A started; 0 s elapsed, ~12 s left")
    assert lines[1].startswith("[2/3] B started;") and "left" in lines[1]
    # A took ~0 s against 2 s before: the estimate for C scales the previous 6 s by that ratio
    assert p.left() < 6.0
    fresh = RT.Progress(["A", "B"], stream=io.StringIO())
    assert fresh.left() is None


def test_progress_bar_counts_records():
    out = io.StringIO()
    seen = []
    p = RT.Progress(["A"], stream=out, bar=True)
    with p.claim("A"), E.observe(seen.append):
        for i in range(3):
            E.Evidence("A", f"s{i}", 0.0, 0.0, "==", 0.0, "float64", "none")
    assert len(seen) == 3 and p.records == 3 and "A:" in out.getvalue()
    E.Evidence("A", "after", 0.0, 0.0, "==", 0.0, "float64", "none")
    assert len(seen) == 3  # observers are removed on exit


def _claim(cid, evidence):
    return Claim(cid, "Lemma 0", "x = x", "none", ("ctrl",), lambda s: list(evidence), {}, {})


def test_cli_footer_and_no_cache(monkeypatch, tmp_path, capsys):
    ev = [E.Evidence("C901", "holds", 0.0, 0.0, "==", 0.0, "float64", "none"),
          E.Evidence("C901", "ctrl", 1.0, 0.0, "==", 0.0, "float64", "none", negative_control=True)]
    monkeypatch.setattr(cli.C, "load_all", lambda: {"C901": _claim("C901", ev)})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.main(["--no-cache", "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0].startswith("[1/1] C901 started;")
    assert "compiling" in captured.out.splitlines()[0]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Time" in md and "Compilation cache: off." in md and "| C901 |" in md.split("## Time")[1]
    timing = R.load_evidence(tmp_path / "r")["timing"]
    assert timing["cache"] is None and set(timing["claims"]) == {"C901"}
    assert cli.main(["--cache-dir", str(tmp_path / "cc"), "--out", str(tmp_path / "r")]) == 0
    assert f"Compilation cache: `{tmp_path / 'cc'}`" in (tmp_path / "r" / "report.md").read_text()
    assert not (tmp_path / "xdg").exists()
