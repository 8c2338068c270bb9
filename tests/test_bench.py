"""The benchmark's own arithmetic: FLOP counting across devices, and the report's tables."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.bench.cli import format_report
from resnet_jax.bench.runner import _analysis, _Compiled


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_flops_count_the_whole_batch_on_one_and_on_eight_devices():
    # A valid 3x3 conv, 16 -> 32 channels, 8x8 -> 6x6: 2 * N*H*W * Cout * 9*Cin FLOPs.
    x = jnp.ones((16, 8, 8, 16), jnp.float32)
    w = jnp.ones((3, 3, 16, 32), jnp.float32)
    expected = 2 * 16 * 6 * 6 * 32 * 9 * 16
    one = _analysis(_Compiled(jax.jit(_conv), x, w), 1)["flops_per_step"]
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    sharded = jax.jit(_conv, in_shardings=(NamedSharding(mesh, P("data")),
                                           NamedSharding(mesh, P())))
    eight = _analysis(_Compiled(sharded, x, w), 8)["flops_per_step"]
    assert one == expected
    assert eight == expected


def _row(**kw):
    return {"model": "resnet20", "dtype": "float32", "batch_size": 128, **kw}


def test_report_projects_the_paper_run_from_the_loop_rows():
    loop = _row(step="loop", steps_per_call=100, trace_and_compile_s=7.5, step_s_median=0.0025,
                step_s_min=0.0024, step_s_max=0.0026, images_per_s=128 / 0.0025,
                projected_paper_run_s=0.0025 * 64_000)
    report = {"backend": "gpu", "devices": ["cuda:0"], "cpu_count": 16, "jax": "x",
              "xla_flags": "", "matmul_peak_flops": 1e14, "rows": [], "compile_only": [],
              "loop": [loop], "data_pipeline": {"batch_size": 128, "images_per_s": 4e5,
                                                "ratio_vs_best_train": None}}
    text = format_report(report)
    line = next(t for t in text.splitlines() if t.startswith("resnet20"))
    assert line.split()[:4] == ["resnet20", "float32", "100", "7.5"]
    assert "51200" in line  # images/s at the median step
    assert "2.7 min (0.04 h)" in line  # 64k steps at 2.5 ms
    # No train row to compare the data pipeline with: no ratio printed, no "-x".
    data_line = next(t for t in text.splitlines() if t.startswith("data pipeline only"))
    assert data_line.endswith("400000 img/s")


def test_loop_rows_from_a_clock_with_known_ticks(monkeypatch):
    from resnet_jax.bench import measure
    from resnet_jax.bench.runner import BenchConfig, bench_loop

    # The timer reads these instants: a warm-up call, then 3 windows of 2 calls of 3 steps
    # each, lasting 0.6, 3.6 and 1.2 s: 0.1, 0.6 and 0.2 s per step (median 0.2, mean 0.3).
    ticks = iter([0.0, 50.0, 100.0, 100.6, 200.0, 203.6, 300.0, 301.2])
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    cfg = BenchConfig(models=["resnet8"], compile_only_models=[], batch_size=16, windows=3,
                      steps_per_call=3, loop_calls=2)
    row = bench_loop(cfg, "resnet8", "float32", num_train=64)
    assert next(ticks, None) is None  # every instant was read
    assert (row["step"], row["steps_per_call"], row["devices"]) == ("loop", 3, len(jax.devices()))
    np.testing.assert_allclose(row["step_s_windows"], [0.1, 0.6, 0.2], rtol=1e-9)
    np.testing.assert_allclose([row["step_s_median"], row["step_s_min"], row["step_s_max"]],
                               [0.2, 0.1, 0.6], rtol=1e-9)
    assert row["images_per_s"] == pytest.approx(80.0)  # 16 images / 0.2 s
    # The paper's 64,000 iterations (from the cifar10 preset) at the median: 12,800 s.
    assert row["paper_steps"] == 64_000
    assert row["projected_paper_run_s"] == pytest.approx(12_800.0)
