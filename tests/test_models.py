"""Model library: parameter counts against the papers, shapes, shortcuts, BN modes, registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import models
from resnet_jax.models import count_params, option_a_shortcut


def abstract(name, **kw):
    """Builds a model's shapes without allocating or initialising (fast for deep nets)."""
    return nnx.eval_shape(lambda: models.create(name, **kw))


# Table 6 of He et al. 2015, to the precision the paper states.
TABLE6_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6, 1202: 19.4e6}


@pytest.mark.parametrize("depth", sorted(TABLE6_PARAMS))
def test_cifar_param_counts_match_table6(depth):
    # Scanned stages build in constant time; their parameter count equals the unrolled one's
    # (checked below), so ResNet-1202 is checked here without unrolling 600 blocks.
    n = count_params(abstract(f"resnet{depth}", scan_blocks=True))
    digits = 1 if depth >= 110 else 2
    assert round(n / 1e6, digits) == pytest.approx(TABLE6_PARAMS[depth] / 1e6)
    assert count_params(abstract(f"plain{depth}", scan_blocks=True)) == n


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "plain20", "preact_bottleneck29"])
def test_scanned_and_unrolled_have_equal_param_counts(name):
    assert count_params(abstract(name)) == count_params(abstract(name, scan_blocks=True))


def test_exact_counts_and_imagenet_counts():
    assert count_params(abstract("resnet20")) == 269_722
    assert count_params(abstract("resnet110", scan_blocks=True)) == 1_727_962
    assert count_params(abstract("resnet18")) == 11_689_512  # torchvision: 11.69M
    assert count_params(abstract("resnet50")) == 25_557_032  # torchvision: 25.56M
    assert round(count_params(abstract("preact_resnet164", scan_blocks=True)) / 1e6, 1) == 1.7
    assert round(count_params(abstract("preact_resnet1001", scan_blocks=True)) / 1e6, 1) == 10.3


def test_option_b_adds_projection_params_only_where_shape_changes():
    a = count_params(abstract("resnet20"))
    b = count_params(abstract("resnet20", shortcut="B"))
    # Two projections (16->32, 32->64): 1x1 kernels plus BN scale and bias.
    assert b - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


@pytest.mark.parametrize(
    "name,shape,classes",
    [
        ("resnet8", (32, 32, 3), 10),
        ("plain8", (32, 32, 3), 10),
        ("preact_resnet8", (32, 32, 3), 10),
        ("preact_bottleneck11", (32, 32, 3), 100),
        ("resnet18", (64, 64, 3), 1000),
        ("resnet50", (64, 64, 3), 1000),
        ("resnet8", (28, 28, 1), 10),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shapes_and_dtypes(name, shape, classes, dtype):
    model = abstract(name, num_classes=classes, in_channels=shape[-1], dtype=dtype)
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    out = nnx.eval_shape(lambda m, x: m(x, return_features=True), model, x)
    logits, feats = out
    assert logits.shape == (2, classes) and logits.dtype == jnp.float32
    assert feats["stage1"].dtype == dtype
    params = nnx.state(model, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_cifar_stage_resolutions_and_widths():
    model = abstract("resnet8")
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    _, feats = nnx.eval_shape(lambda m, x: m(x, return_features=True), model, x)
    assert feats["stage1"].shape == (1, 32, 32, 16)
    assert feats["stage2"].shape == (1, 16, 16, 32)
    assert feats["stage3"].shape == (1, 8, 8, 64)
    assert feats["pooled"].shape == (1, 64)


def test_option_a_shortcut_is_parameter_free_identity():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    np.testing.assert_array_equal(option_a_shortcut(x, 16, 1), x)
    y = option_a_shortcut(x, 32, 2)
    assert y.shape == (2, 4, 4, 32)
    np.testing.assert_array_equal(y[..., :16], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(y[..., 16:], 0)


def test_block_with_zeroed_residual_branch_passes_input_through():
    layers = models.LayerFactory()
    block = models.BasicBlock(layers, 16, 16, 1, shortcut="A", rngs=nnx.Rngs(0))
    assert block.projection is None
    block.bn2.scale[...] = jnp.zeros_like(block.bn2.scale[...])  # zero the residual branch
    block.eval()
    x = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 8, 8, 16)))
    np.testing.assert_allclose(block(x), x, atol=1e-6)
    # Downsampling block: output is relu(subsampled, zero-padded input).
    down = models.BasicBlock(layers, 16, 32, 2, shortcut="A", rngs=nnx.Rngs(0))
    down.bn2.scale[...] = jnp.zeros_like(down.bn2.scale[...])
    down.eval()
    np.testing.assert_allclose(down(x), option_a_shortcut(x, 32, 2), atol=1e-6)
    # The plain twin with the same zeroed branch outputs zeros: no shortcut at all.
    plain = models.BasicBlock(layers, 16, 16, 1, shortcut="none", rngs=nnx.Rngs(0))
    plain.bn2.scale[...] = jnp.zeros_like(plain.bn2.scale[...])
    plain.eval()
    np.testing.assert_allclose(plain(x), 0.0, atol=1e-6)


def test_zero_init_last_bn():
    model = models.create("resnet8", zero_init_last_bn=True)
    assert float(jnp.abs(model.stages[0].first.bn2.scale[...]).max()) == 0.0
    default = models.create("resnet8")
    assert float(default.stages[0].first.bn2.scale[...].min()) == 1.0


def test_train_mode_updates_bn_stats_and_eval_is_deterministic():
    model = models.create("resnet8")
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3)) * 3 + 1
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
    model.train()
    model(x)
    after = nnx.state(model, nnx.BatchStat)
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    changed = [not np.allclose(a, b) for a, b in pairs]
    assert all(changed)
    model.eval()
    y1, y2 = model(x), model(x)
    np.testing.assert_array_equal(y1, y2)
    assert jax.tree.all(jax.tree.map(np.array_equal, after, nnx.state(model, nnx.BatchStat)))
    # Eval mode normalises with running statistics: one example's logits don't depend on the batch.
    np.testing.assert_allclose(model(x[:1]), y1[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,match",
    [
        ("resnet21", "6n\\+2"),
        ("plain30", "6n\\+2"),
        ("preact_bottleneck21", "9n\\+2"),
        ("vgg16", "Valid names"),
        ("imagenet_resnet20", "18, 34, 50, 101, 152"),
    ],
)
def test_registry_errors_explain(name, match):
    with pytest.raises(ValueError, match=match):
        models.create(name)


def test_bad_shortcut_lists_choices():
    with pytest.raises(ValueError, match="'A', 'B', 'C', 'none'"):
        models.create("resnet8", shortcut="D")


def test_registry_resolves_names():
    assert models.parse_name("resnet56") == ("cifar_resnet", 56)
    assert models.parse_name("resnet50") == ("imagenet_resnet", 50)
    assert models.parse_name("cifar_resnet50") == ("cifar_resnet", 50)
    assert models.parse_name("plain110") == ("cifar_plain", 110)
    assert models.parse_name("preact_resnet164") == ("cifar_preact_bottleneck", 164)
    assert models.parse_name("preact_resnet110") == ("cifar_preact", 110)


def test_ghost_batchnorm_normalises_each_group():
    from resnet_jax.models import GhostBatchNorm

    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 2 + 5
    x = x.at[4:].add(10.0)  # the two halves have different statistics
    full = GhostBatchNorm(3, group_size=8, rngs=nnx.Rngs(0))
    reference = nnx.BatchNorm(3, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(full(x), reference(x), atol=1e-4)
    np.testing.assert_allclose(full.mean[...], reference.mean[...], atol=1e-4)
    ghost = GhostBatchNorm(3, group_size=4, rngs=nnx.Rngs(0))
    y = ghost(x)
    for half in (y[:4], y[4:]):  # each group is normalised by its own statistics
        np.testing.assert_allclose(half.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
        np.testing.assert_allclose(half.std(axis=(0, 1, 2)), 1.0, atol=1e-3)
    np.testing.assert_allclose(ghost.mean[...], 0.1 * x.mean(axis=(0, 1, 2)), atol=1e-4)
    model = models.create("resnet8", bn_group_size=4)
    assert isinstance(model.stages[0].first.bn1, GhostBatchNorm)
    assert count_params(model) == count_params(models.create("resnet8"))
