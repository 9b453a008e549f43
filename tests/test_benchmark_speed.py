"""The issue-19 benchmark scripts: their Markdown from recorded results (no timing run here)."""
from benchmarks import curvature_compare as CC
from benchmarks import report_speed as RS


def _run(wall, compile_, hits, verdicts, measured):
    claims = {"C1": {"wall": wall, "compile_total": compile_, "run": wall - compile_, "trace": 0.1, "lower": 0.1,
                     "compile": compile_ - 0.2, "cpu": wall, "programs": 3, "cache_hits": hits}}
    return {"wall_s": wall + 5, "cpu_s": wall + 4, "loadavg_start": (2.0, 0, 0), "loadavg_end": (2.5, 0, 0),
            "timing": {"claims": claims}, "verdicts": verdicts, "measured": measured}


def test_report_speed_markdown_compares_cold_and_warm():
    res = {"date": "2026-12-06", "host": "cpu, 2 CPUs", "python": "3.11", "jax": "0.10",
           "runs": {"quick": {"cold": _run(10.0, 8.0, 0, {"C1": True}, {"C1": [1.0]}),
                              "warm": _run(3.0, 1.0, 3, {"C1": True}, {"C1": [1.0]})}}}
    md = RS.markdown(res)
    assert "| quick | cold | 15.0 |" in md and "| quick | warm | 8.0 |" in md
    assert md.count("| same | identical |") == 2
    res["runs"]["quick"]["warm"]["measured"] = {"C1": [2.0]}
    assert "| same | differ |" in RS.markdown(res)
    assert "| C1 | 10.0 | 8.0 | 2.0 | 3.0 | 1.0 | 2.0 |" in md


def test_curvature_compare_markdown_ratio_is_fastest_pytorch_over_ours():
    q = {"wall_s": 1.0, "first_call_s": 2.0, "value": [3.0, 2.0]}
    tool = lambda s: {"topk": {"wall_s": s, "value": [3.0, 2.0]},  # noqa: E731
                      "trace": {"wall_s": s, "value": {"estimate": 5.0, "stderr": 0.5}},
                      "slq": {"wall_s": s, "value": {"moment1": 0.1, "max_node": 3.0}}}
    row = {"model": "vgg", "mode": "train", "loss": {"jax": 2.3, "torch": 2.3},
           "jax": {"topk": q, "trace": dict(q, value={"estimate": 5.1, "stderr": 0.4}),
                   "slq": dict(q, value={"moment1": 0.1, "max_node": 3.0})},
           "pyhessian": tool(6.0), "hessian_eigenthings": tool(4.0)}
    res = {"date": "d", "hardware": {"cpu_model": "x", "cores": 2}, "versions": {"jax": "j", "torch": "t"},
           "command": "c", "args": {"topk": 2, "lanczos_steps": 20, "power_iters": 20, "trace_samples": 20,
                                    "slq_steps": 20}, "compare": [row]}
    md = CC.markdown(res)
    assert md.count("| 4.0x (2.0x) |") == 3 and "5.1 +- 0.4" in md
