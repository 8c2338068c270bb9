"""PyTorch <-> ours: logits of converted nets match the torch nets; keys, files, fine-tuning."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from helpers_torch_resnets import AkamasterResNet, TorchvisionResNet, randomize

import resnet_jax
from resnet_jax.cli import main
from resnet_jax.convert import (
    LAYOUTS,
    classifier_from_state_dict,
    read_state_dict,
    stack_like,
    torchvision_state_dict,
    unstack,
)
from resnet_jax.convert.akamaster import widen_permutation
from resnet_jax.inference.export import flatten_names, read_export
from resnet_jax.train import graphdefs

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A torch model's state_dict as numpy arrays."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_logits(model: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def our_model(clf) -> nnx.Module:
    """The eval-mode network of a Classifier, to call on any input size."""
    _, eval_def = graphdefs(ml_collections.ConfigDict({"model": clf.model_config}), clf.spec)
    return nnx.merge(eval_def, *clf.params())


@pytest.mark.parametrize("depth,legacy", [(20, True), (56, False)])
def test_akamaster_file_converts_to_identical_logits(tmp_path, capsys, depth, legacy):
    net = randomize(AkamasterResNet(depth), 32, seed=depth)
    path = tmp_path / f"resnet{depth}.th"
    # Their checkpoints: the legacy (pre-zip) format, DataParallel's "module." prefix, wrapped.
    torch.save({"best_prec1": 91.0, "state_dict": {f"module.{k}": v
                                                   for k, v in net.state_dict().items()}},
               path, _use_new_zipfile_serialization=not legacy)
    out = tmp_path / "model.safetensors"
    assert main(["convert", "--from", "akamaster", str(path), "--out", str(out)]) == 0
    assert f"cifar_resnet depth {depth}" in capsys.readouterr().out  # depth from the keys

    clf = resnet_jax.load(out, batch_size=8)
    assert clf.class_names[:3] == ("airplane", "automobile", "bird")
    images = np.random.default_rng(depth).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    expected = torch_logits(net, ((images / 255.0 - MEAN) / STD).astype(np.float32))
    got = clf.logits(images)
    assert np.abs(expected).max() > 0.5  # a real comparison, not of near-zero outputs
    assert np.abs(got - expected).max() <= 1e-4


def test_both_sides_padding_is_a_channel_permutation():
    # Stage 2 (16 -> 32): our identity channels 0..15 are their 8..23; our zeros their 0..7,
    # 24..31. Stage 3 (32 -> 64) composes: our k < 32 is their 16 + perm2[k].
    perm2 = widen_permutation(None, 16, 32)
    assert perm2 == (*range(8, 24), *range(8), *range(24, 32))
    perm3 = widen_permutation(perm2, 32, 64)
    assert perm3[:32] == tuple(16 + p for p in perm2)
    assert perm3[32:] == (*range(16), *range(48, 64))
    assert sorted(perm3) == list(range(64))


@pytest.mark.parametrize("depth,size", [(18, 64), (50, 48)])  # ResNet-50's last stage at 2x2
def test_torchvision_converts_both_ways(depth, size):
    net = randomize(TorchvisionResNet(depth, num_classes=7), size, seed=depth)
    state = numpy_state(net)
    clf = classifier_from_state_dict(state, LAYOUTS["torchvision"])
    assert (clf.model_config.depth, clf.num_classes) == (depth, 7)
    x = np.random.default_rng(depth).normal(size=(2, size, size, 3)).astype(np.float32)
    expected = torch_logits(net, x)
    got = np.asarray(our_model(clf)(x))
    assert np.abs(expected).max() > 0.5
    assert np.abs(got - expected).max() <= 1e-4

    back = torchvision_state_dict(clf)
    twin = TorchvisionResNet(depth, num_classes=7)
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
    for key, value in numpy_state(twin).items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_convert_to_torchvision_file_from_an_export(tmp_path, capsys):
    net = randomize(TorchvisionResNet(18, num_classes=1000), 64, seed=1)
    pth = tmp_path / "tv.pth"
    torch.save(net.state_dict(), pth)
    model = tmp_path / "r18.safetensors"
    assert main(["convert", "--from", "torchvision", str(pth), "--model", "resnet18",
                 "--out", str(model)]) == 0
    meta, _ = read_export(model)
    assert meta["class_names"][:2] == ["tench", "goldfish"]
    assert meta["image_shape"] == [224, 224, 3]
    # predict converts images as torchvision scored these weights: Resize(256), CenterCrop(224).
    assert meta["center_crop"] == {"size": 224, "resize": 256}
    out = tmp_path / "back.pth"
    assert main(["convert", "--to", "torchvision", str(model), "--out", str(out)]) == 0
    assert "resnet18(num_classes=1000)" in capsys.readouterr().out
    twin = TorchvisionResNet(18)
    twin.load_state_dict(torch.load(out, weights_only=True), strict=True)
    twin.eval()
    x = np.random.default_rng(2).normal(size=(1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(torch_logits(twin, x), torch_logits(net, x))


def test_unknown_keys_are_named(tmp_path, capsys):
    state = numpy_state(AkamasterResNet(8))
    state["layer1.0.conv9.weight"] = state.pop("layer1.0.conv1.weight")
    with pytest.raises(ValueError, match=r"missing keys \['layer1.0.conv1.weight'\]; "
                                         r"unexpected keys \['layer1.0.conv9.weight'\]"):
        classifier_from_state_dict(state, LAYOUTS["akamaster"])

    path = tmp_path / "r8.th"
    torch.save(AkamasterResNet(8).state_dict(), path)
    # A depth that the keys contradict: the blocks it lacks are the missing keys.
    assert main(["convert", "--from", "akamaster", str(path), "--model", "resnet14",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing keys ['layer1.1.bn1.bias'" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["convert", "--from", "torchvision", str(path),
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a torchvision ResNet: blocks per stage [1, 1, 1, 0]" in capsys.readouterr().err

    junk = tmp_path / "junk.th"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.th is not a PyTorch checkpoint"):
        read_state_dict(junk)


def test_cifar_model_has_no_torchvision_twin(tmp_path, capsys):
    state = numpy_state(randomize(AkamasterResNet(8), 32))
    model = tmp_path / "r8.safetensors"
    classifier_from_state_dict(state, LAYOUTS["akamaster"]).export(model)
    assert main(["convert", "--to", "torchvision", str(model),
                 "--out", str(tmp_path / "x.pth")]) == 2
    assert "no torchvision twin: model.family='cifar_resnet'" in capsys.readouterr().err


def test_missing_torch_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch now fails
    path = tmp_path / "r.th"
    path.write_bytes(b"")
    assert main(["convert", "--from", "akamaster", str(path), "--out", "x.safetensors"]) == 2
    assert "pip install 'resnet-jax[torch]'" in capsys.readouterr().err


def test_scanned_stages_stack_and_unstack():
    from resnet_jax import models

    def shapes(name, **kw):
        _, p, b = nnx.split(nnx.eval_shape(lambda: models.create(name, **kw)),
                            nnx.Param, nnx.BatchStat)
        return {k: v.shape for prefix, tree in (("params", p), ("batch_stats", b))
                for k, v in zip(flatten_names(nnx.to_pure_dict(tree), prefix),
                                jax.tree.leaves(nnx.to_pure_dict(tree)), strict=True)}

    plain, scanned = shapes("resnet20"), shapes("resnet20", scan_blocks=True)
    rng = np.random.default_rng(0)
    tensors = {k: rng.normal(size=s).astype(np.float32) for k, s in plain.items()}
    stacked = stack_like(tensors, scanned)
    assert {k: v.shape for k, v in stacked.items()} == scanned
    # Block i of a scanned stage is rest[i]: the order the scan runs them in.
    kernel = stacked["params/stages/2/rest/conv2/kernel"]
    assert kernel.shape == (2, 3, 3, 64, 64)
    for i in range(2):
        np.testing.assert_array_equal(kernel[i], tensors[f"params/stages/2/rest/{i}/conv2/kernel"])
    back = unstack(stacked)
    assert back.keys() == tensors.keys()
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)
