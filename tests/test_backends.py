"""The backend seam: every backend gives the stock model's values, any block runs under every
backend, auto picks a backend that can run, and the models package holds no backend code.

oneDNN's kernels (resnet_jax/backends/onednn/) are part of the install on Linux x86-64; elsewhere
the oneDNN cases check only the fallback.
"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import resnet_jax
from resnet_jax import backends, models
from resnet_jax.backends.onednn import conv as onednn_conv
from resnet_jax.config import ConfigError, get_preset, validate

needs_onednn = pytest.mark.skipif(not onednn_conv.available(),
                                  reason=f"oneDNN unavailable: {onednn_conv.unavailable_reason()}")
NHWC = ("NHWC", "HWIO", "NHWC")
B = onednn_conv.BLOCK
FACTORIES = ("plain", "xla_cpu", "onednn") if onednn_conv.available() else ("plain", "xla_cpu")


def _rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@needs_onednn
@pytest.mark.parametrize("n,h,ci,co,k,stride", [
    (4, 16, 16, 16, 3, 1),   # a first-stage 3x3 convolution
    (4, 16, 16, 32, 3, 2),   # the subsampling convolution of stage 2
    (4, 16, 16, 32, 1, 2),   # an option B projection
    (4, 16, 3, 16, 3, 1),    # the stem, reading the images as NCHW
])
def test_onednn_conv_matches_lax(n, h, ci, co, k, stride):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, h, ci), dtype=np.float32)
    kernel = rng.standard_normal((k, k, ci, co), dtype=np.float32) * 0.2
    p = (k - 1) // 2

    def ref(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)),
                                            dimension_numbers=NHWC)

    def ours(x, kernel):
        return onednn_conv.conv2d_nhwc(x, kernel, stride, (p, p, p, p))

    y_ref, vjp_ref = jax.vjp(ref, x, kernel)
    y, vjp = jax.vjp(jax.jit(ours), x, kernel)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) < 1e-5
    g = rng.standard_normal(y.shape, dtype=np.float32)
    for got, want in zip(jax.jit(vjp)(g), vjp_ref(g), strict=True):
        assert _rel(got, want) < 1e-5


@needs_onednn
def test_cifar_shapes_run_jit_kernels_in_the_native_block():
    """Every pass of the CIFAR shapes runs a JIT kernel for this CPU (16-channel blocks with
    AVX-512, 8 with AVX2), not oneDNN's slow reference code."""
    isa = {"avx512": "avx512", "avx2": "avx2"}.get(backends.cpu_isa())
    assert B == (16 if isa == "avx512" else 8)
    for x_shape, k_shape, stride in [((128, 16 // B, 32, 32, B), (3, 3, 16, 16), 1),
                                     ((128, 16 // B, 32, 32, B), (3, 3, 16, 32), 2),
                                     ((128, 64 // B, 8, 8, B), (3, 3, 64, 64), 1),
                                     ((128, 3, 32, 32), (3, 3, 3, 16), 1)]:
        impls = onednn_conv.implementations(
            onednn_conv.conv_shape(x_shape, k_shape, stride, (1, 1, 1, 1)))
        assert set(impls) == ({"f", "w"} if len(x_shape) == 4 else {"f", "d", "w"})
        assert all(v.startswith("jit") for v in impls.values()), impls
        if isa:
            assert all(isa in v for v in impls.values()), impls


def test_blocked_layout_round_trip():
    x = jnp.arange(2 * 3 * 4 * 32, dtype=jnp.float32).reshape(2, 3, 4, 32)
    b = onednn_conv.to_blocked(x)
    assert b.shape == (2, 32 // B, 3, 4, B)
    assert float(b[1, 13 // B, 2, 3, 13 % B]) == float(x[1, 2, 3, 13])
    np.testing.assert_array_equal(onednn_conv.from_blocked(b), x)


class SqueezeExcitationBlock(nnx.Module):
    """A researcher's block (Hu et al. 2018): a basic block whose residual branch is rescaled per
    channel by a gate from its global average. Convolutions, norms and activations come from the
    factory; the gate is its own NHWC code (a mean over H and W, Linear layers across channels)."""

    expansion = 1

    def __init__(self, layers, in_features, features, strides=1, *, shortcut="A",
                 zero_init_last_bn=False, rngs):
        self.conv1 = layers.conv(in_features, features, 3, strides, rngs=rngs)
        self.bn1 = layers.norm(features, rngs=rngs)
        self.conv2 = layers.conv(features, features, 3, 1, rngs=rngs)
        self.bn2 = layers.norm(features, rngs=rngs)
        self.squeeze = nnx.Linear(features, max(features // 4, 1), rngs=rngs)
        self.excite = nnx.Linear(max(features // 4, 1), features, rngs=rngs)
        self.act = layers.act
        self.features, self.strides = features, strides

    def __call__(self, x):
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        gate = jax.nn.sigmoid(self.excite(nnx.relu(self.squeeze(jnp.mean(y, axis=(1, 2))))))
        return self.act(y * gate[:, None, None, :]
                        + models.option_a_shortcut(x, self.features, self.strides))


def _train(model_fn, x, y, steps: int = 3):
    """Losses of `steps` SGD steps and the gradients of the first, BN in train mode."""
    graphdef, params, stats = nnx.split(model_fn(), nnx.Param, nnx.BatchStat)
    tx = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step(params, stats, opt_state):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, stats, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return loss, nnx.state(m, nnx.BatchStat)

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss, grads

    opt_state, losses, first_grads = tx.init(params), [], None
    for _ in range(steps):
        params, stats, opt_state, loss, grads = step(params, stats, opt_state)
        losses.append(float(loss))
        first_grads = grads if first_grads is None else first_grads
    return np.array(losses), first_grads


def _worst_leaf(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    # Relative per leaf; a leaf whose true value is ~0 is measured against the largest leaf.
    floor = 1e-3 * max(float(jnp.max(jnp.abs(v))) for v in lb)
    return max(float(jnp.max(jnp.abs(u - v))) / max(float(jnp.max(jnp.abs(v))), floor)
               for u, v in zip(la, lb, strict=True))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.standard_normal((16, 32, 32, 3), dtype=np.float32)),
            jnp.asarray(rng.integers(0, 10, 16)))


@pytest.mark.parametrize("name,kwargs", [
    ("resnet8", {"block_cls": SqueezeExcitationBlock}),  # a block the library does not know
    ("resnet8", {}),  # option A shortcuts, unrolled stages
    ("preact_resnet8", {"scan_blocks": True, "shortcut": "B"}),  # projections, scanned stages
])
def test_every_backend_trains_like_the_stock_layers(batch, name, kwargs):
    x, y = batch
    block_cls = kwargs.pop("block_cls", None)

    def make(factory):
        if block_cls is None:
            return lambda: models.create(name, seed=0, layer_factory=factory, **kwargs)
        return lambda: models.ResNet(block_cls=block_cls, stage_sizes=(1, 1, 1),
                                     stage_widths=(16, 32, 64), layer_factory=factory,
                                     rngs=nnx.Rngs(0))

    ref_losses, ref_grads = _train(make(backends.layer_factory("plain")), x, y)
    assert ref_losses[-1] < ref_losses[0]  # it does train
    for name_ in FACTORIES[1:]:
        losses, grads = _train(make(backends.layer_factory(name_)), x, y)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name_)
        assert _worst_leaf(grads, ref_grads) < 1e-4, name_


@needs_onednn
def test_onednn_runs_what_it_can_and_says_what_it_cannot(capfd):
    """A convolution oneDNN cannot run (here: output channels off its block) is XLA's, said once
    in one line; the values are the stock layer's."""
    factory = backends.layer_factory("onednn")()
    conv = factory.conv(16, 12, 3, 1, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 16)), jnp.float32)
    ref = jax.lax.conv_general_dilated(x, conv.kernel[...], (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=NHWC)
    for _ in range(2):
        np.testing.assert_allclose(conv(x), ref, rtol=1e-5, atol=1e-5)
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "oneDNN backend" in ln]
    assert lines == [f"oneDNN backend: XLA runs convolutions with 12 output channels (needs a "
                     f"multiple of {B})."]


def test_auto_picks_a_backend_that_runs_here(monkeypatch):
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert backends.select("auto", platform="gpu")[0] == "plain"
    assert backends.select("auto", platform="tpu", num_devices=8)[0] == "plain"
    # A custom call has no partitioning rule: several CPU devices keep XLA's convolutions.
    assert backends.select("auto", platform="cpu", num_devices=8)[0] == "xla_cpu"
    assert backends.select("auto", dtype=bf16, platform="cpu", num_devices=1)[0] == "xla_cpu"
    for isa in ("avx2", "avx512"):
        monkeypatch.setattr(backends, "cpu_isa", lambda isa=isa: isa)
        want = backends.FASTER_ON_CPU[isa] if onednn_conv.available() else "xla_cpu"
        assert backends.select("auto", dtype=f32, platform="cpu", num_devices=1)[0] == want
    monkeypatch.setattr(backends, "cpu_isa", lambda: "other")
    assert backends.select("auto", dtype=f32, platform="cpu", num_devices=1)[0] == "xla_cpu"
    assert backends.select("plain", platform="cpu", num_devices=1) == ("plain", "chosen")
    with pytest.raises(ValueError, match=r"backend='cudnn' is not valid; choose one of"):
        backends.select("cudnn")
    with pytest.raises(ValueError, match=r"backend='onednn' cannot run here: the gpu backend"):
        backends.select("onednn", platform="gpu")
    config = get_preset("quick")
    config.model.backend = "mkl"
    with pytest.raises(ConfigError, match=r"model.backend='mkl'.*'auto', 'plain', 'xla_cpu'"):
        validate(config)


def test_missing_library_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv(onednn_conv.ENV_LIBRARY, str(tmp_path / "libdnnl.so.3"))
    onednn_conv._load.cache_clear()
    try:
        assert not onednn_conv.available()
        assert "libdnnl.so.3" in onednn_conv.unavailable_reason()
        monkeypatch.setattr(backends, "cpu_isa", lambda: "avx2")
        backend, why = backends.select("auto", platform="cpu", num_devices=1)
        assert backend == "xla_cpu" and "libdnnl.so.3" in why
        with pytest.raises(ValueError, match="backend='onednn' cannot run here.*libdnnl.so.3"):
            backends.select("onednn", platform="cpu", num_devices=1)
    finally:
        monkeypatch.delenv(onednn_conv.ENV_LIBRARY)
        onednn_conv._load.cache_clear()
    assert onednn_conv.available() == (onednn_conv._library_path() is not None)


def test_models_hold_the_architecture_only():
    """resnet_jax/models/ imports no backend, data or training code and names no backend
    machinery: speed-ups reach it only through the LayerFactory."""
    root = Path(resnet_jax.__file__).parent / "models"
    for path in sorted(root.glob("*.py")):
        text = path.read_text()
        assert not re.findall(r"onednn|blocked|materialize|optimization_barrier|canonical_conv",
                              text, re.IGNORECASE), path.name
        imports = re.findall(r"^\s*(?:from|import) (resnet_jax\.\w+)", text, re.MULTILINE)
        assert set(imports) <= {"resnet_jax.models"}, (path.name, imports)


def test_ffi_ctypes_target_runs_and_reports_errors():
    """The ctypes FFI plumbing on its own: a copy kernel, and an error that reaches jax."""
    import ctypes

    from resnet_jax.backends.onednn import ffi_ctypes

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


def test_runs_made_with_conv_impl_load_as_backend(tmp_path):
    """Run directories from before `model.backend` (they saved `model.conv_impl`) still load."""
    import json

    from resnet_jax.config import default_config, load_run_config
    from resnet_jax.train.loop import config_to_dict

    saved = config_to_dict(default_config())
    del saved["model"]["backend"]
    saved["model"]["conv_impl"] = "xla"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = load_run_config(tmp_path)
    assert config.model.backend == "xla_cpu" and "conv_impl" not in config.model
    validate(config)
