"""The benchmark suite's bookkeeping: the hardware it records and the tables it writes (no timing here)."""
import pytest

from benchmarks import common, run
from benchmarks.studies import convnet_study

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
cache size\t: 1024 KB
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 avx512_vnni

processor\t: 1
model name\t: another CPU
flags\t\t: fpu
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm sve
CPU implementer\t: 0x41
"""


def test_cpu_info_reads_the_first_processor_and_its_vector_extensions():
    info = common.cpu_info(X86)
    assert info == {"cpu_model": "AMD EPYC", "vendor": "AuthenticAMD", "family": "26", "model": "2",
                    "stepping": "1", "cache": "1024 KB",
                    "cpu_features": ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]}
    assert common.cpu_info(ARM)["cpu_features"] == ["asimd", "sve"]
    assert common.cpu_info("")["cpu_features"] == []


def _entry(framework, dtype, variant, examples_per_s, model="resnet", batch=1024):
    return {"model": model, "batch": batch, "framework": framework, "dtype": dtype, "variant": variant,
            "examples_per_s": examples_per_s, "examples_per_s_iqr": [examples_per_s, examples_per_s]}


def _result(train):
    hw = {"cpu_model": "AMD EPYC", "processor": "x86_64", "family": "26", "cores": 16, "platform": "Linux",
          "python": "3.12", "loadavg": [0.0] * 3, "date": "2026-12-05T00:00:00", "cpu_features": ["avx2"]}
    return {"mode": "quick", "hardware": hw, "versions": {"jax": "0.11"}, "allocator": {"name": "system"},
            "settings": {"repeats": 5, "min_time_s": 0.2, "torch_threads": 16, "models": {}},
            "sections": {"train": train}}


def test_the_markdown_names_the_accelerator_and_pairs_jax_and_pytorch_by_dtype():
    train = {"backend": "gpu", "device": "NVIDIA H100 80GB HBM3", "device_count": 1,
             "torch_config": {"device": "cuda", "cuda_device": "NVIDIA H100 80GB HBM3", "torch_cuda": "13.0"},
             "entries": [_entry("jax", "float32", "jit", 300.0), _entry("jax", "bfloat16", "jit", 900.0),
                         _entry("torch", "float32", "eager NCHW", 200.0),
                         _entry("torch", "bfloat16", "eager NCHW", 600.0),
                         _entry("torch", "bfloat16", "eager channels_last", 750.0)]}
    md = run.markdown(_result(train))
    assert "- Accelerator: 1 x NVIDIA H100 80GB HBM3 (gpu)" in md
    assert "CPU features: avx2" in md and "TF32" in md
    rows = {line.split(" | ")[2]: line for line in md.splitlines() if line.startswith("| resnet | 1024 |")}
    assert rows["float32"].endswith("| **1.50** |")  # 300 / 200
    assert rows["bfloat16"].endswith("| **1.20** |")  # 900 / the faster PyTorch layout, 750


def test_a_missing_pytorch_peer_is_said_and_leaves_no_ratio():
    train = {"backend": "tpu", "device": "TPU v5 lite", "device_count": 4,
             "torch_skipped": "this torch build has no device for JAX's backend 'tpu'",
             "entries": [_entry("jax", "bfloat16", "jit", 900.0)]}
    md = run.markdown(_result(train))
    assert "No PyTorch peer: this torch build has no device for JAX's backend 'tpu'." in md
    row = next(line for line in md.splitlines() if line.startswith("| resnet | 1024 | bfloat16"))
    assert row.endswith("| - |")


def test_bf16_and_no_torch_reach_every_timing_worker():
    args = run.parse_args(["--quick", "--bf16", "--no-torch"])
    assert {"--bf16", "--no-torch"} <= set(run.worker_options(args))
    assert not {"--bf16", "--no-torch"} & set(run.worker_options(run.parse_args(["--quick"])))


def test_the_convnet_section_runs_only_the_chosen_studies():
    calls = []

    def spawn(worker, extra, env=None):
        calls.append((worker, extra, env))
        return {"entries": []}

    args = run.parse_args(["--quick", "--sections", "convnet", "--convnet-studies", "convs_percore"])
    out = convnet_study.orchestrate(args, spawn)
    assert list(out) == ["convs_percore"] and len(calls) == 1
    assert calls[0][1][:2] == ["--study", "convs"] and "--pin-core" in calls[0][1]
    assert "torch_cl" in calls[0][1][3]
    args = run.parse_args(["--sections", "convnet", "--convnet-studies", "convs,flags"])
    with pytest.raises(SystemExit, match="unknown convnet studies"):
        convnet_study.orchestrate(args, spawn)
    assert len(calls) == 1  # nothing spawned for a bad name
    standalone = convnet_study.parse_args(["--quick", "--studies", "convs_percore"])  # the study on its own
    assert convnet_study.orchestrate(standalone, spawn) == out and calls[1] == calls[0]


def test_the_studies_run_their_own_workers(monkeypatch):
    """The convnet section's workers are subprocesses of the study's module (not of ``benchmarks.run``), with
    the allocator's environment under the call's own."""
    seen = []
    monkeypatch.setattr(convnet_study, "spawn_worker",
                        lambda module, worker, extra, env=None: seen.append((module, worker, extra, env)) or {})
    convnet_study.spawner({"LD_PRELOAD": "x"})("convnet", ["--study", "bnpool"], env={"XLA_FLAGS": "f"})
    assert seen == [("benchmarks.studies.convnet_study", "convnet", ["--study", "bnpool"],
                     {"LD_PRELOAD": "x", "XLA_FLAGS": "f"})]
    args = convnet_study.parse_args(["--worker", "convnet", "--json", "o.json", "--study", "steps", "--batches",
                                     "128", "--clock", "cpu", "--pin-core", "0", "--repeats", "5"])
    assert (args.study, args.clock, args.pin_core, args.no_torch) == ("steps", "cpu", 0, False)


def test_the_pytorch_peer_runs_where_jax_runs_or_not_at_all():
    torch = pytest.importorskip("torch")  # the optional `bench` extra
    assert common.torch_device("cpu") == "cpu"
    assert common.torch_device("tpu") is None
    assert common.torch_device("gpu") == ("cuda" if torch.cuda.is_available() else None)
    assert common.torch_precision_settings("cpu") == {"device": "cpu"}  # nothing changed on the CPU


@pytest.mark.parametrize("arch", ["mlp", "convnet"])
def test_the_pytorch_peer_trains_in_bfloat16(arch):
    """The peer's bfloat16 step (parameters, BN statistics and activations in bfloat16, as the JAX entry it
    is paired with) runs, keeps its dtypes and lowers the loss of a fixed batch; the float32 peer is the
    control of the dtype check."""
    torch = pytest.importorskip("torch")
    import numpy as np

    from benchmarks import torch_reference as tr
    from rate_tuning import models

    _, shape = common.MODELS[arch]
    model = models.build(arch, "paper", **({"widths": (16,)} if arch == "mlp" else {"channels": (4, 8)}))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32,) + shape).astype(np.float32), rng.integers(0, 10, 32)
    for dtype in (torch.bfloat16, torch.float32):
        step, module, _ = tr.make_step(model, model.labels("layer"), shape, lr_w=0.1, lr_g=0.1, dtype=dtype)
        xt, yt = tr.to_torch_batch(x, y, dtype)
        losses = [float(step(xt, yt).detach()) for _ in range(20)]
        assert {p.dtype for p in module.parameters()} | {b.dtype for b in module.buffers()} == {dtype}
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
