"""akamaster/pytorch_resnet_cifar10: CIFAR-10 ResNet-20/32/44/56/110/1202 (option A shortcuts).

Keys: `conv1`, `bn1`, `layer{1,2,3}.{b}.conv{1,2}`, `layer{1,2,3}.{b}.bn{1,2}`, `linear`.

Their option A shortcut pads the new channels of a widening block on *both* sides of the
identity channels (width/4 zero channels before, width/4 after); ours appends them after. The
two nets are the same function up to a permutation of each stage's channels: with `perm[k]` the
torch channel holding our channel k, a stage that widens from `w_in` to `w_out` maps our
identity channels k < w_in to `w_out // 4 + perm_prev[k]` and our padded channels to the
torch zero channels in order. Applying that permutation to every channel axis in the stage
(conv outputs and inputs, BN vectors) and to the classifier's inputs gives our net with
appended zeros, unchanged; the permutation of stage 3 composes with that of stage 2.
"""

from __future__ import annotations

from resnet_jax.convert.layout import Layout, block_counts, numbered, our_block
from resnet_jax.convert.mapping import Layer
from resnet_jax.data.catalog import DATASETS
from resnet_jax.models.registry import CIFAR_WIDTHS

Perm = tuple[int, ...] | None


def widen_permutation(prev: Perm, w_in: int, w_out: int) -> Perm:
    """The stage permutation after a block that widens `w_in` -> `w_out` with both-sides pads."""
    if w_in == w_out:
        return prev
    lo = w_out // 4  # their LambdaLayer: F.pad(..., (0, 0, 0, 0, planes // 4, planes // 4))
    if w_out - w_in != 2 * lo:
        raise ValueError(f"a {w_in} -> {w_out} option A block is not a doubling; "
                         "both-sides padding is only defined for doublings.")
    prev = tuple(range(w_in)) if prev is None else prev
    return (*(lo + p for p in prev), *range(lo), *range(lo + w_in, w_out))


def infer_depth(keys: set[str]) -> int:
    """6n+2 from the number n of blocks in each of `layer1`..`layer3`."""
    counts = block_counts(keys, 3)
    if len(set(counts)) != 1 or counts[0] == 0 or any(k.startswith("layer4.") for k in keys):
        raise ValueError(f"these keys are not an akamaster CIFAR ResNet: blocks per stage "
                         f"{counts} (layer1..layer3 must hold the same number n >= 1 of blocks, "
                         "and there is no layer4); use --from torchvision for ImageNet nets.")
    return 6 * counts[0] + 2


def layers(depth: int) -> list[Layer]:
    """The `Layer` list of akamaster's `resnet{depth}`, with the option A permutations."""
    n = (depth - 2) // 6
    result = [Layer("stem_conv", "conv1", "conv"), Layer("stem_norm", "bn1", "bn")]
    perm: Perm = None
    width = CIFAR_WIDTHS[0]
    for s, w_out in enumerate(CIFAR_WIDTHS):
        stage_perm = widen_permutation(perm, width, w_out)
        for b in range(n):
            ours, theirs = our_block(s, b), f"layer{s + 1}.{b}"
            in_perm = perm if b == 0 else stage_perm
            result += [
                Layer(f"{ours}/conv1", f"{theirs}.conv1", "conv", stage_perm, in_perm),
                Layer(f"{ours}/bn1", f"{theirs}.bn1", "bn", stage_perm),
                Layer(f"{ours}/conv2", f"{theirs}.conv2", "conv", stage_perm, stage_perm),
                Layer(f"{ours}/bn2", f"{theirs}.bn2", "bn", stage_perm),
            ]
        perm, width = stage_perm, w_out
    result.append(Layer("head", "linear", "linear", in_perm=perm))
    return result


def class_names(num_classes: int) -> tuple[str, ...]:
    """CIFAR-10's names for a 10-class head, else numbers."""
    names = DATASETS["cifar10"].class_names
    return names if num_classes == len(names) else numbered(num_classes)


LAYOUT = Layout(
    name="akamaster",
    family="cifar_resnet",
    shortcut="A",
    depths="6n+2 (resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202)",
    infer_depth=infer_depth,
    layers=layers,
    head="linear",
    dataset="cifar10",
    image_shape=(32, 32, 3),
    # Their training script's transforms.Normalize (ImageNet's statistics, on [0, 1] RGB).
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    class_names=class_names,
)
