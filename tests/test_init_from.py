"""`config.train.init_from`: a run starts from a converted model file (head, gray stem)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from helpers_torch_resnets import AkamasterResNet, randomize
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import resnet_jax
from resnet_jax.config import ConfigError
from resnet_jax.convert import LAYOUTS, classifier_from_state_dict
from resnet_jax.inference.export import flatten, read_export
from resnet_jax.train import create_state, graphdefs, make_mesh, make_optimizer
from resnet_jax.train.pretrained import init_from_file


@pytest.fixture(scope="module")
def converted_r8(tmp_path_factory):
    """An akamaster-layout ResNet-8 with 5 classes, random weights, converted to our format."""
    net = randomize(AkamasterResNet(8, num_classes=5), 32, seed=3)
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("init_from") / "r8.safetensors"
    classifier_from_state_dict(state, LAYOUTS["akamaster"]).export(path)
    return path


def _fresh_state(config, spec):
    mesh = make_mesh()
    t = config.train
    tx = make_optimizer(config.optim, t.batch_size, t.num_steps)
    return create_state(config, spec, tx, NamedSharding(mesh, P())), mesh


def _host(tree):
    """A replicated pytree as host numpy arrays."""
    return jax.tree.map(lambda v: np.asarray(v.addressable_data(0)), tree)


def _eval_model(config, spec, params, batch_stats) -> nnx.Module:
    return nnx.merge(graphdefs(config, spec)[1], params, batch_stats)


def test_init_from_takes_the_weights_new_head_and_gray_stem(converted_r8, sample_dataset):
    config = tiny_config()
    config.train.init_from = str(converted_r8)
    spec = sample_dataset.spec  # 28x28x1, 10 classes: another head, a 1-channel stem
    fresh, mesh = _fresh_state(config, spec)
    state, notes = init_from_file(fresh, config, spec, mesh)
    text = "\n".join(notes)
    assert "classifier head re-initialised: the file has 5 classes, this run 10" in text
    assert "3-channel stem summed over its input channels" in text

    _, file_tensors = read_export(converted_r8)
    params, batch_stats = _host((state.params, state.batch_stats))
    got = {**flatten(params, "params"), **flatten(batch_stats, "batch_stats")}
    before = flatten(_host(fresh.params), "params")
    for name, value in got.items():
        if name.startswith("params/head/"):
            np.testing.assert_array_equal(value, before[name], err_msg=name)
        elif name == "params/stem_conv/kernel":
            np.testing.assert_array_equal(value, file_tensors[name].sum(axis=2, keepdims=True))
        else:
            np.testing.assert_array_equal(value, file_tensors[name], err_msg=name)

    # The gray net answers a gray image as the file's RGB net answers it replicated to RGB.
    rgb_clf = resnet_jax.load(converted_r8, batch_size=8)
    rgb = _eval_model(ml_collections.ConfigDict({"model": rgb_clf.model_config}), rgb_clf.spec,
                      *rgb_clf.params())
    gray = _eval_model(config, spec, params, batch_stats)
    x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
    _, f_gray = gray(x, return_features=True)
    _, f_rgb = rgb(np.repeat(x, 3, axis=-1), return_features=True)
    assert np.abs(np.asarray(f_rgb["pooled"])).max() > 0.1
    np.testing.assert_allclose(np.asarray(f_gray["pooled"]), np.asarray(f_rgb["pooled"]),
                               atol=1e-5)


def test_init_from_that_does_not_fit_names_the_tensors(converted_r8, sample_dataset, tmp_path):
    config = tiny_config()
    config.model.depth = 14
    config.train.init_from = str(converted_r8)
    fresh, mesh = _fresh_state(config, sample_dataset.spec)
    with pytest.raises(ConfigError, match=r"\(cifar_resnet depth 8\) does not fit config.model "
                       r"\(cifar_resnet depth 14\): params/stages/0/rest/0/bn1/bias missing"):
        init_from_file(fresh, config, sample_dataset.spec, mesh)
    config.train.init_from = str(tmp_path / "none.safetensors")
    with pytest.raises(ConfigError, match="init_from=.*none.safetensors': no such file"):
        init_from_file(fresh, config, sample_dataset.spec, mesh)


def test_finetune_run_starts_from_the_file(converted_r8, sample_dataset, tmp_path, capsys):
    from resnet_jax.train import train_and_evaluate

    config = tiny_config(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2,
                         steps_per_call=1)
    config.train.init_from = str(converted_r8)
    config.optim.learning_rate = 1e-6  # two steps barely move the weights: the start shows
    config.optim.weight_decay = 0.0
    result = train_and_evaluate(config, tmp_path / "run", dataset=sample_dataset,
                                interactive=False)
    assert np.isfinite(result["test_loss"])
    assert "classifier head re-initialised" in capsys.readouterr().out
    params, _ = resnet_jax.load(tmp_path / "run", batch_size=8).params()
    _, file_tensors = read_export(converted_r8)
    for name, value in flatten(params, "params").items():
        if name.startswith("params/head/"):
            continue
        start = file_tensors[name]
        if name == "params/stem_conv/kernel":
            start = start.sum(axis=2, keepdims=True)
        np.testing.assert_allclose(value, start, atol=1e-4, err_msg=name)
