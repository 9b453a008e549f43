"""benchmarks.profile_step: per-operation times of the train step from JAX's profiler trace."""
import pytest

from benchmarks import profile_step as ps


def test_op_times_sum_each_operation_per_step_and_leave_the_runtime_out():
    trace = {"traceEvents": [
        {"ph": "X", "name": "ynn_fusion.3", "dur": 3000}, {"ph": "X", "name": "ynn_fusion.3", "dur": 1000},
        {"ph": "X", "name": "ynn_fusion.12", "dur": 2000}, {"ph": "X", "name": "transpose_copy_fusion", "dur": 500},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},   # the executor around the operations
        {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 9500},   # a Python frame
        {"ph": "X", "name": "PjitFunction(train_step)", "dur": 100},
        {"ph": "i", "name": "ynn_fusion.3"},  # an instant event has no duration
    ]}
    times = ps.op_times(trace, steps=2)
    assert times == {"ynn_fusion.3": 2.0, "ynn_fusion.12": 1.0, "transpose_copy_fusion": 0.25}
    assert ps.by_kind(times) == {"ynn_fusion": 3.0, "transpose_copy_fusion": 0.25}


@pytest.mark.slow  # compiles and profiles a train step: several seconds on a shared CPU
def test_profile_of_a_real_step_lists_its_operations(tmp_path):
    hlo = tmp_path / "step.hlo"
    times = ps.profile("mlp", batch=16, conv_impl="auto", steps=2, hlo_path=str(hlo))
    assert times and all(ms >= 0 for ms in times.values())
    text = hlo.read_text()
    assert all(name in text for name in times)  # every timed operation is defined in the compiled HLO


def test_bad_arguments_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        ps.main(["--model", "mlp", "--steps", "0"])
    assert e.value.code == 2 and "--batch and --steps must be >= 1" in capsys.readouterr().err
