"""The PyTorch twin of resnet_jax's CIFAR ResNet (He et al. 2015 sec. 4.2, option A shortcuts).

Same architecture, same parameter counts (asserted: 269,722 / 853,018 / 1,727,962 for ResNet-20 /
56 / 110), same step (cross-entropy + 1e-4 weight decay on kernels via SGD momentum 0.9, BN in
train mode). Used only by the benchmark's `--vs-torch`; never imported by the library.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

EXPECTED_PARAMS = {20: 269_722, 56: 853_018, 110: 1_727_962}


class OptionA(nn.Module):
    """Identity shortcut, strided subsampling, zero-padded channels (no parameters)."""

    def __init__(self, out_features: int, stride: int):
        super().__init__()
        self.out_features, self.stride = out_features, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample and pad channels (dim 1 in NCHW)."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_features - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra > 0 else x


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus shortcut, then ReLU."""

    def __init__(self, in_f: int, out_f: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_f, out_f, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_f)
        self.conv2 = nn.Conv2d(out_f, out_f, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_f)
        self.shortcut = OptionA(out_f, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The residual block."""
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 widths, global average pool, linear classifier."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n, rem = divmod(depth - 2, 6)
        assert rem == 0 and n >= 1, depth
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, in_f = [], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(BasicBlock(in_f, width, 2 if (i > 0 and j == 0) else 1))
                in_f = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        x = F.relu(self.bn(self.conv(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def num_params(model: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TorchTrainer:
    """A ready-to-time train step and eval step of the twin at one batch size (random data).

    `device` "cuda" runs it on the GPU in channels-last layout (cuDNN's fast NHWC kernels);
    `dtype` "bfloat16" runs the forward pass under autocast (float32 weights, as in the JAX
    bf16 step). Steps return the loss as a tensor, so GPU steps queue without a host sync.
    """

    def __init__(self, depth: int, batch_size: int, *, channels_last: bool | None = None,
                 seed: int = 0, device: str = "cpu", dtype: str = "float32",
                 compile: bool = False):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # Fixed shapes: let cuDNN pick its fastest kernels, as XLA autotunes its own.
            torch.backends.cudnn.benchmark = True
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=dtype == "bfloat16")
        self.model = CifarResNet(depth)
        if depth in EXPECTED_PARAMS:
            assert num_params(self.model) == EXPECTED_PARAMS[depth], num_params(self.model)
        # L2 weight decay on every parameter, as the library's paper preset (optim.weight_decay).
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9,
                                   weight_decay=1e-4)
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(device=self.device, memory_format=fmt)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, 3, 32, 32, generator=g)
        self.x = x.to(device=self.device, memory_format=fmt)
        self.y = torch.randint(0, 10, (batch_size,), generator=g).to(self.device)
        self.forward = torch.compile(self.model) if compile else self.model

    def precision(self) -> str:
        """What the convolutions compute in: TF32 where cuDNN may use it, else float32."""
        if self.device.type == "cuda" and torch.backends.cudnn.allow_tf32:
            return "TF32 (torch.backends.cudnn.allow_tf32=True)"
        return f"float32 ({self.device.type})"

    def train_step(self) -> torch.Tensor:
        """One SGD step in train mode; returns the loss (a tensor: no host sync)."""
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = F.cross_entropy(self.forward(self.x).float(), self.y)
        loss.backward()
        self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def eval_step(self) -> torch.Tensor:
        """One forward pass in eval mode; returns the loss (a tensor)."""
        self.model.eval()
        with self.autocast:
            return F.cross_entropy(self.forward(self.x).float(), self.y)

    def sync(self) -> None:
        """Waits for queued GPU work (no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def serve(depth: int, batch_size: int, device: str = "cpu", dtype: str = "float32",
          mode: str = "eager") -> None:
    """Timing server for `resnet-jax bench --vs-torch`: one line `train|eval N` in, one line out.

    The reply is the mean seconds per step over N steps (GPU work waited for). The bench runs this
    in a child process so that PyTorch's OpenMP threads (which spin while waiting, by design) and
    XLA's threads never share a process: in one process, merely importing torch slowed XLA's
    ResNet-20 step by ~30%.
    """
    trainer = TorchTrainer(depth, batch_size, device=device, dtype=dtype,
                           compile=mode == "compile")
    print("ready", trainer.precision(), flush=True)
    for line in sys.stdin:
        kind, n = line.split()
        step = trainer.train_step if kind == "train" else trainer.eval_step
        trainer.sync()
        t = time.perf_counter()
        for _ in range(int(n)):
            loss = step()
        float(loss)  # the last step's result on the host, as the JAX windows block on theirs
        trainer.sync()
        print(repr((time.perf_counter() - t) / int(n)), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7])
        sys.exit(0)
    for d, expected in EXPECTED_PARAMS.items():
        assert num_params(CifarResNet(d)) == expected
        print(f"resnet{d}: {expected:,} parameters")
