"""CPU speed features keep the maths: scanned stages equal unrolled ones, the XLA:CPU backend's
convolution, BatchNorm and fusion barrier equal the stock ones; CPU flag plumbing."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from resnet_jax import models
from resnet_jax.backends import xla_cpu
from resnet_jax.backends import xla_flags as platform


def _build(scan_blocks: bool, remat: bool = False):
    """(graphdef, state) of ResNet-20, initialised under jit (eager NNX init is slow)."""

    def make():
        # XLA:CPU's layers: stock lax convolutions inside `scan` fall to a naive loop on CPU.
        return models.create("resnet20", scan_blocks=scan_blocks, remat=remat, seed=0,
                             layer_factory=xla_cpu.XlaCpuLayers)

    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1])()
    return graphdef, state


def _stack_rest(unrolled: dict) -> dict:
    """Unrolled pure-dict state -> scanned layout: each stage's `rest` blocks stacked on axis 0."""
    out = dict(unrolled)
    out["stages"] = {}
    for i, stage in unrolled["stages"].items():
        rest = [stage["rest"][j] for j in sorted(stage["rest"])]
        out["stages"][i] = {**stage, "rest": jax.tree.map(lambda *xs: jnp.stack(xs), *rest)}
    return out


@pytest.fixture(scope="module")
def twins():
    """The unrolled ResNet-20 and a scanned one holding exactly the same parameters."""
    u_def, u_state = _build(scan_blocks=False)
    s_def, s_state = _build(scan_blocks=True)
    stacked = _stack_rest(nnx.to_pure_dict(u_state))
    nnx.replace_by_pure_dict(s_state, stacked)
    return (u_def, u_state), (s_def, s_state)


def _loss_and_grads(graphdef, state, x, y, train: bool):
    @jax.jit
    def f(state):
        params, rest = nnx.split_state(state, nnx.Param, ...)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.train() if train else model.eval()
            logits = model(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, nnx.state(model, nnx.BatchStat))

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, aux, grads

    return f(state)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_scanned_and_unrolled_stages_agree(twins, train):
    (u_def, u_state), (s_def, s_state) = twins
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(4, 32, 32, 3), jnp.float32)
    y = jnp.asarray(rng.randint(0, 10, 4), jnp.int32)
    u_loss, (u_logits, u_stats), u_grads = _loss_and_grads(u_def, u_state, x, y, train)
    s_loss, (s_logits, s_stats), s_grads = _loss_and_grads(s_def, s_state, x, y, train)
    np.testing.assert_allclose(s_logits, u_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s_loss, u_loss, rtol=1e-5)
    # Gradients (and, in train mode, the updated BN statistics) in the stacked layout.
    for got, want in ((s_grads, u_grads), (s_stats, u_stats)):
        want = _stack_rest(nnx.to_pure_dict(want))
        got = nnx.to_pure_dict(got)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_remat_does_not_change_gradients(twins):
    _, (s_def, s_state) = twins
    r_def, _ = _build(scan_blocks=True, remat=True)
    x = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3), jnp.float32)
    y = jnp.arange(2, dtype=jnp.int32)
    _, _, g = _loss_and_grads(s_def, s_state, x, y, True)
    _, _, r = _loss_and_grads(r_def, s_state, x, y, True)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(r), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_configure_cpu_respects_user_flags_and_running_backend(monkeypatch):
    # conftest has already set a device count and jax is running in this process.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(platform, "backend_initialized", lambda: False)
    added = platform.configure_cpu(num_devices=8)
    assert added == [platform.CONV_FLAG]  # the user's device count wins
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=3", platform.CONV_FLAG]
    assert platform.configure_cpu() == []  # idempotent
    monkeypatch.setenv("XLA_FLAGS", "")
    assert platform.configure_cpu(num_devices=1) == [platform.CONV_FLAG]
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert platform.configure_cpu() == [] and os.environ["XLA_FLAGS"] == ""


def test_configure_cpu_is_a_no_op_once_jax_runs(monkeypatch):
    jax.devices()  # the backend is certainly up now
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    with pytest.warns(UserWarning, match="already initialised"):
        assert platform.configure_cpu() == []
    assert os.environ["XLA_FLAGS"] == ""


@pytest.mark.parametrize("kernel,stride,pad,size", [(3, 1, 1, 8), (3, 2, 1, 8), (1, 2, 0, 8),
                                                    (7, 2, 3, 9), (3, 2, 1, 7)])
def test_canonical_conv_matches_lax_conv(kernel, stride, pad, size):
    from resnet_jax.backends.xla_cpu import canonical_conv2d

    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(3, size, size, 4), jnp.float32)
    k = jnp.asarray(rng.randn(kernel, kernel, 4, 5), jnp.float32)

    def ref(x, k):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def ours(x, k):
        return canonical_conv2d(x, k, stride, (pad, pad, pad, pad))

    np.testing.assert_allclose(ours(x, k), ref(x, k), rtol=1e-5, atol=1e-5)
    ct = jnp.asarray(rng.randn(*ref(x, k).shape), jnp.float32)
    g_ref = jax.vjp(ref, x, k)[1](ct)
    g_ours = jax.vjp(ours, x, k)[1](ct)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,stride,pad,size", [
    (3, 2, (1, 1, 1, 1), 16), (3, 2, (0, 1, 1, 0), 9), (1, 2, (0, 0, 0, 0), 7),
    (4, 2, (2, 4, 4, 2), 8), (7, 2, (3, 3, 3, 3), 9), (5, 3, (1, 5, 5, 1), 10)])
def test_strided_input_grad_matches_autodiff(kernel, stride, pad, size):
    """The sub-pixel input gradient equals lax's (dilated) one, asymmetric and odd cases too."""
    from resnet_jax.backends.xla_cpu import strided_input_grad

    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(2, size, size + 1, 3), jnp.float32)
    k = jnp.asarray(rng.randn(kernel, kernel, 3, 4), jnp.float32)
    pt, pb, pl, pr = pad

    def conv(x):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), ((pt, pb), (pl, pr)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    y, vjp = jax.vjp(conv, x)
    dy = jnp.asarray(rng.randn(*y.shape), jnp.float32)
    got = strided_input_grad(dy, k, stride, pad, (size, size + 1))
    np.testing.assert_allclose(got, vjp(dy)[0], rtol=1e-5, atol=1e-5)


def test_xla_cpu_factory_conv_takes_the_canonical_path(monkeypatch):
    """nnx.Conv passes extra keywords (`out_sharding=None`); they must not bypass the switch."""
    calls = []
    real = xla_cpu.canonical_conv2d
    monkeypatch.setattr(xla_cpu, "canonical_conv2d", lambda *a: calls.append(a[2:]) or real(*a))
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    conv = xla_cpu.XlaCpuLayers().conv(4, 6, 3, 2, rngs=nnx.Rngs(0))
    assert conv(x).shape == (2, 4, 4, 6)
    assert calls == [(2, (1, 1, 1, 1))]
    # The stock factory (what `resnet_jax.models` uses alone) leaves convolutions to lax.
    calls.clear()
    assert models.LayerFactory().conv(4, 6, 3, 2, rngs=nnx.Rngs(0))(x).shape == (2, 4, 4, 6)
    assert calls == []


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_closed_form_batch_norm_matches_nnx_batch_norm(dtype):
    from resnet_jax.backends.batch_norm import BatchNorm

    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(8, 5, 5, 6) * 3 + 1, dtype)
    ct = jnp.asarray(rng.randn(8, 5, 5, 6), dtype)
    ours = BatchNorm(6, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))
    ref = nnx.BatchNorm(6, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))
    for bn in (ours, ref):  # a non-trivial affine part, the same in both
        bn.scale[...] = jnp.linspace(0.5, 2.0, 6)
        bn.bias[...] = jnp.linspace(-1.0, 1.0, 6)

    def vjp(bn):
        graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

        def f(x, params):
            model = nnx.merge(graphdef, params, stats, copy=True)
            return model(x), nnx.state(model, nnx.BatchStat)

        y, pullback, new_stats = jax.vjp(f, x, params, has_aux=True)
        return y, pullback(ct), new_stats

    y, (gx, gp), stats = vjp(ours)
    y_ref, (gx_ref, gp_ref), stats_ref = vjp(ref)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert y.dtype == y_ref.dtype == dtype and gx.dtype == dtype
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.float32(gx), np.float32(gx_ref), rtol=tol, atol=tol)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(gp[name][...], gp_ref[name][...], rtol=tol, atol=tol * 10)
    for name in ("mean", "var"):
        np.testing.assert_allclose(stats[name][...], stats_ref[name][...], rtol=1e-5, atol=1e-5)
    # The gradient is not trivially zero: sum(gx) over the batch vanishes only per channel.
    assert float(jnp.abs(gx.astype(jnp.float32)).sum()) > 1.0
    ours.eval()
    ref.eval()
    np.testing.assert_array_equal(np.float32(ours(x)), np.float32(ref(x)))


@pytest.mark.parametrize("shift", [10.0, 100.0])
def test_batch_norm_backward_keeps_float32_accuracy_far_from_zero_mean(shift):
    # dscale = inv * (sum(g * x) - mean * sum(g)) cancels when |mean| >> sigma; against a
    # float64 evaluation of the textbook sum(g * xhat) it must stay at float32 accuracy.
    from resnet_jax.backends.batch_norm import normalize

    rng = np.random.RandomState(0)
    x = (rng.randn(64, 16, 16, 8) + shift).astype(np.float32)
    g = (rng.randn(*x.shape) + 0.1 * (x - shift)).astype(np.float32)
    axes = (0, 1, 2)
    x64 = x.astype(np.float64)
    mean = x64.mean(axes)
    inv = 1.0 / np.sqrt(x64.var(axes) + 1e-5)
    scale = np.linspace(0.5, 2.0, 8)
    xhat = (x64 - mean) * inv
    n = x.size // 8
    dscale = (g * xhat).sum(axes)
    dx = scale * inv * (g - g.sum(axes, dtype=np.float64) / n - xhat * dscale / n)

    def f(x, s, b):
        return normalize(x, jnp.float32(mean), jnp.float32(inv), s, b, axes)

    _, pullback = jax.vjp(f, jnp.asarray(x), jnp.float32(scale), jnp.zeros(8, jnp.float32))
    gx, gs, gb = pullback(jnp.asarray(g))
    assert np.abs(np.asarray(gs) - dscale).max() < 1e-5 * np.abs(dscale).max()
    assert np.abs(np.asarray(gx) - dx).max() < 1e-5 * np.abs(dx).max()
    np.testing.assert_allclose(np.asarray(gb), g.sum(axes, dtype=np.float64), rtol=1e-5)


def test_materialize_is_a_bitwise_identity_that_survives_xla():
    from resnet_jax.backends.xla_cpu import materialize

    x = jnp.asarray(np.random.RandomState(0).randn(4, 6, 6, 3), jnp.float32)
    x = x.at[0, 0, 0, 0].set(jnp.inf).at[0, 0, 0, 1].set(-0.0)
    for dtype in (jnp.float32, jnp.bfloat16):
        xd = x.astype(dtype)
        y, pullback = jax.vjp(jax.jit(materialize), xd)
        np.testing.assert_array_equal(np.asarray(y).view(np.uint8), np.asarray(xd).view(np.uint8))
        (g,) = pullback(xd)
        np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(xd).view(np.uint8))
    # The division must reach the compiled program: XLA drops optimization barriers before
    # fusion, and were the one visible it would fold `x / 1` away (and recompute chains again).
    hlo = jax.jit(lambda v: materialize(jnp.maximum(v, 0.0))).lower(x).compile().as_text()
    assert " divide(" in hlo


def test_malloc_tuning_only_where_it_applies(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert not platform.malloc_tuning_applies()  # the user's choice wins
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(platform.ENV_NO_REEXEC, "1")
    assert not platform.malloc_tuning_applies()
    monkeypatch.delenv(platform.ENV_NO_REEXEC)
    monkeypatch.setattr(platform, "_thp_available", lambda: False)
    assert not platform.malloc_tuning_applies()
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    platform.reexec_with_malloc_tuning()
    assert calls == []
    monkeypatch.setattr(platform, "_thp_available", lambda: True)
    monkeypatch.setattr(platform.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(platform.sys, "platform", "linux")
    platform.reexec_with_malloc_tuning()
    (exe, argv, env), = calls
    assert exe == platform.sys.executable and argv[1:] == platform.sys.orig_argv[1:]
    assert env["GLIBC_TUNABLES"] == platform.MALLOC_TUNABLE
