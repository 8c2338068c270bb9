"""oneDNN's direct convolutions (resnet_jax/kernels/onednn_conv.py) against XLA's.

The oneDNN path must give XLA's values (forward, both gradients, BN statistics, eval mode) and
really run oneDNN's JIT kernels. It is part of the install on Linux x86-64; elsewhere these tests
check only the fallback.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import models
from resnet_jax.config import ConfigError, get_preset, validate
from resnet_jax.kernels import onednn_conv

needs_onednn = pytest.mark.skipif(not onednn_conv.available(),
                                  reason=f"oneDNN unavailable: {onednn_conv.unavailable_reason()}")
NHWC = ("NHWC", "HWIO", "NHWC")


def _rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@needs_onednn
@pytest.mark.parametrize("n,h,ci,co,k,stride", [
    (4, 16, 16, 16, 3, 1),   # a first-stage 3x3 convolution
    (4, 16, 16, 32, 3, 2),   # the subsampling convolution of stage 2
    (4, 16, 16, 32, 1, 2),   # an option B projection
    (4, 16, 3, 16, 3, 1),    # the stem on an NCHW image batch
])
def test_conv2d_matches_lax(n, h, ci, co, k, stride):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, h, ci), dtype=np.float32)
    kernel = rng.standard_normal((k, k, ci, co), dtype=np.float32) * 0.2
    p = (k - 1) // 2

    def ref(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)),
                                            dimension_numbers=NHWC)

    def ours(x, kernel):
        xin = onednn_conv.to_blocked(x) if ci % 8 == 0 else x.transpose(0, 3, 1, 2)
        return onednn_conv.from_blocked(onednn_conv.conv2d(xin, kernel, stride, (p, p, p, p)))

    y_ref, vjp_ref = jax.vjp(ref, x, kernel)
    y, vjp = jax.vjp(jax.jit(ours), x, kernel)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) < 1e-5
    g = rng.standard_normal(y.shape, dtype=np.float32)
    for got, want in zip(jax.jit(vjp)(g), vjp_ref(g), strict=True):
        assert _rel(got, want) < 1e-5


@needs_onednn
def test_cifar_shapes_run_jit_kernels():
    """Every pass of the CIFAR shapes runs a JIT kernel, not oneDNN's slow reference code."""
    for x_shape, k_shape, stride in [((128, 2, 32, 32, 8), (3, 3, 16, 16), 1),
                                     ((128, 2, 32, 32, 8), (3, 3, 16, 32), 2),
                                     ((128, 8, 8, 8, 8), (3, 3, 64, 64), 1),
                                     ((128, 3, 32, 32), (3, 3, 3, 16), 1)]:
        impls = onednn_conv.implementations(
            onednn_conv.conv_shape(x_shape, k_shape, stride, (1, 1, 1, 1)))
        assert set(impls) == ({"f", "w"} if len(x_shape) == 4 else {"f", "d", "w"})
        assert all(v.startswith("jit") for v in impls.values()), impls


def test_blocked_layout_round_trip():
    x = jnp.arange(2 * 3 * 4 * 16, dtype=jnp.float32).reshape(2, 3, 4, 16)
    b = onednn_conv.to_blocked(x)
    assert b.shape == (2, 2, 3, 4, 8)
    assert float(b[1, 1, 2, 3, 5]) == float(x[1, 2, 3, 13])  # channel 13 = block 1, lane 5
    np.testing.assert_array_equal(onednn_conv.from_blocked(b), x)


def _train_and_eval(name: str, conv_impl: str, x, y, **kwargs):
    """Loss, logits, gradients and new BN statistics of one train-mode call, and eval logits."""
    model = models.create(name, conv_impl=conv_impl, seed=0, **kwargs)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss_fn(p, s):
        m = nnx.merge(graphdef, p, s, copy=True)
        logits = m(x)
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        return loss, (logits, nnx.state(m, nnx.BatchStat))

    (loss, (logits, new_stats)), grads = jax.jit(
        jax.value_and_grad(loss_fn, has_aux=True))(params, stats)
    m = nnx.merge(graphdef, params, new_stats)
    m.eval()
    m.set_attributes(record_responses=True)

    def evaluate(m):
        eval_logits, feats = m(x, return_features=True)
        # The paper's Fig. 7 quantity, as the ablation analysis reads it.
        feats["response1"] = m.stages[1].first.response1.get_value()[0]
        return eval_logits, feats

    eval_logits, feats = jax.jit(evaluate)(m)
    return loss, logits, grads, new_stats, eval_logits, feats


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.standard_normal((16, 32, 32, 3), dtype=np.float32)),
            jnp.asarray(rng.integers(0, 10, 16)))


@needs_onednn
@pytest.mark.parametrize("name,kwargs", [
    ("resnet8", {}),  # option A shortcuts, unrolled stages
    ("preact_resnet8", {"scan_blocks": True, "shortcut": "B"}),  # projections, scanned stages
])
def test_model_matches_xla(batch, name, kwargs):
    x, y = batch
    xla = _train_and_eval(name, "xla", x, y, **kwargs)
    ours = _train_and_eval(name, "onednn", x, y, **kwargs)
    assert abs(float(ours[0]) - float(xla[0])) < 1e-5
    assert _rel(ours[1], xla[1]) < 1e-5
    for what, a, b in (("grads", ours[2], xla[2]), ("stats", ours[3], xla[3])):
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(la) == len(lb) > 0
        # Relative per leaf, but a leaf whose true value is ~0 (a projection BN's bias before
        # the next BN: 4e-9 on both paths) is measured against the largest leaf instead.
        floor = 1e-3 * max(float(jnp.max(jnp.abs(v))) for v in lb)
        worst = max(float(jnp.max(jnp.abs(u - v))) / max(float(jnp.max(jnp.abs(v))), floor)
                    for u, v in zip(la, lb, strict=True))
        assert worst < 1e-4, (what, worst)
    assert _rel(ours[4], xla[4]) < 1e-5
    assert xla[5]["response1"].shape == (16, 16, 16, 32)
    for key in xla[5]:  # features and layer responses come back NHWC on both paths
        assert ours[5][key].shape == xla[5][key].shape
        assert _rel(ours[5][key], xla[5][key]) < 1e-5


def test_auto_choice_and_bad_values():
    m = models.create("resnet8")
    # The test session simulates 8 devices: "auto" then keeps XLA's (partitionable) convolutions.
    assert jax.device_count() == 8 and m.uses_onednn() is False
    assert models.create("resnet8", conv_impl="xla").uses_onednn() is False
    with pytest.raises(ValueError, match=r"conv_impl='cudnn' is not valid; choose one of"):
        models.create("resnet8", conv_impl="cudnn")
    bf16 = models.create("resnet8", conv_impl="onednn", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        bf16.uses_onednn()
    assert models.create("resnet8", dtype=jnp.bfloat16).uses_onednn() is False
    config = get_preset("quick")
    config.model.conv_impl = "mkl"
    with pytest.raises(ConfigError, match=r"model.conv_impl='mkl'.*'auto', 'xla', 'onednn'"):
        validate(config)


def test_missing_library_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv(onednn_conv.ENV_LIBRARY, str(tmp_path / "libdnnl.so.3"))
    onednn_conv._load.cache_clear()
    try:
        assert not onednn_conv.available()
        assert "libdnnl.so.3" in onednn_conv.unavailable_reason()
        with pytest.raises(RuntimeError, match="conv_impl='onednn'.*libdnnl.so.3"):
            models.create("resnet8", conv_impl="onednn").uses_onednn()
    finally:
        monkeypatch.delenv(onednn_conv.ENV_LIBRARY)
        onednn_conv._load.cache_clear()
    assert onednn_conv.available() == (onednn_conv._library_path() is not None)


def test_ffi_ctypes_target_runs_and_reports_errors():
    """The ctypes FFI plumbing on its own: a copy kernel, and an error that reaches jax."""
    import ctypes

    from resnet_jax.kernels import ffi_ctypes

    def copy(out: int, ins: list[int]) -> None:
        ctypes.memmove(out, ins[0], 4 * 6)

    def fail(out: int, ins: list[int]) -> str:
        return "bad shape 7; valid: 6"

    for name, fn in (("test_copy", copy), ("test_fail", fail)):
        if not ffi_ctypes.registered(name):
            ffi_ctypes.register_cpu_target(name, fn)
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    call = jax.ffi.ffi_call("test_copy", jax.ShapeDtypeStruct(x.shape, x.dtype))
    np.testing.assert_array_equal(jax.jit(lambda v: call(v * 2))(x), x * 2)
    bad = jax.ffi.ffi_call("test_fail", jax.ShapeDtypeStruct(x.shape, x.dtype))
    with pytest.raises(Exception, match="bad shape 7; valid: 6"):
        jax.block_until_ready(jax.jit(bad)(x))
