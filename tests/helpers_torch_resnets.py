"""PyTorch twins of the two ResNet layouts the converter reads, written for the tests.

torchvision itself does not import beside the pinned CPU torch here, so `TorchvisionResNet`
reproduces torchvision.models.ResNet's structure and state_dict key names (conv1, bn1,
layer1.0.conv1, ..., layer2.0.downsample.0/1, fc). `AkamasterResNet` reproduces the CIFAR
ResNets of akamaster/pytorch_resnet_cifar10 (conv1, bn1, layer1..3, linear), whose option A
shortcut zero-pads the new channels on both sides of the identity channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free k x k convolution with 'same'-style padding, as in both layouts."""
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


class CifarBlock(nn.Module):
    """akamaster's basic block with the both-sides option A shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3), nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else None
        self.stride = stride

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.pad is not None:
            x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(y + x)


class AkamasterResNet(nn.Module):
    """A 6n+2 CIFAR ResNet in akamaster's layout."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = conv(3, 16, 3), nn.BatchNorm2d(16)
        cin = 16
        for s, width in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                blocks.append(CifarBlock(cin, width, 2 if (b == 0 and s > 0) else 1))
                cin = width
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, planes, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv(planes, planes * 4, 1), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


TORCHVISION_DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                      50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
                      152: (Bottleneck, (3, 8, 36, 3))}


class TorchvisionResNet(nn.Module):
    """torchvision.models.resnet{depth}(num_classes=...) in structure and key names."""

    def __init__(self, depth: int, num_classes: int = 1000):
        super().__init__()
        block, sizes = TORCHVISION_DEPTHS[depth]
        self.conv1, self.bn1 = conv(3, 64, 7, 2), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for s, (n, planes) in enumerate(zip(sizes, (64, 128, 256, 512), strict=True)):
            blocks = []
            for b in range(n):
                stride = 2 if (b == 0 and s > 0) else 1
                down = None
                if stride != 1 or cin != planes * block.expansion:
                    down = nn.Sequential(conv(cin, planes * block.expansion, 1, stride),
                                         nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(cin, planes, stride, down))
                cin = planes * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(x.mean(dim=(2, 3)))


def randomize(model: nn.Module, image_hw: int, seed: int = 0, batch: int = 4) -> nn.Module:
    """Random weights and BN affine parameters; running statistics set from one random batch.

    Running statistics that match the activations, and small scales on each block's last BN
    (as trained nets have), keep a deep random net's activations O(1): float32 rounding then
    stays far below the 1e-4 the tests compare logits to. Then the model is put in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    last_bns = {id(m.bn3 if isinstance(m, Bottleneck) else m.bn2) for m in model.modules()
                if isinstance(m, BasicBlock | Bottleneck | CifarBlock)}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                low, high = (0.1, 0.4) if id(m) in last_bns else (0.5, 1.5)
                m.weight.copy_(low + (high - low) * torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.momentum = 1.0  # the next train-mode pass sets the running statistics
        model.train()
        model(torch.randn(batch, 3, image_hw, image_hw, generator=gen))
    return model.eval()
