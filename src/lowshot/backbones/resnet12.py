"""ResNet-12, the standard few-shot backbone (MetaOptNet, Lee et al. 2019; mmfewshot).

Four residual blocks of widths 64-160-320-640; each block is 3 x (conv3x3 + BN) with
LeakyReLU(0.1), a 1x1 conv + BN shortcut, and a 2x2 max-pool. Global average pooling gives
a 640-d embedding (84 px inputs end at 5x5). Regularisation follows MetaOptNet and the
Negative-Margin code: DropBlock (block 5) after blocks 3-4, plain dropout after blocks 1-2,
both at ``drop_rate`` and only in training.

DropBlock ramp (``dropblock_ramp_steps > 0``): the DropBlock rate of blocks 3-4 grows linearly
from 0 to ``drop_rate`` over that many training steps; the dropout of blocks 1-2 stays at the
full rate from step 0. That is bl0/negative-margin.few-shot lib/backbone/resnet12.py:62-69
(``keep_rate = max(1 - drop_rate / (20 * 2000) * num_batches_tracked, 1 - drop_rate)`` only in
the ``drop_block`` branch, ``F.dropout(p=drop_rate)`` otherwise; the step count is the block's
BatchNorm ``num_batches_tracked``, read before this batch updates it, :42), i.e. a 40 000-step
ramp; mmfewshot's copy (mmfewshot/classification/models/backbones/resnet12.py:77-87) is the same
code, but its recipes build the backbone with its default ``drop_rate=0.0`` (:113), so no
dropout at all. The step is the trainer's global step (``set_train_step``, called by
``lowshot.train`` before every forward pass); without a trainer each training forward pass
counts one step. It lives in the ``num_steps`` buffer, so checkpoints resume the ramp exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dropblock import DropBlock
from .registry import check_common, init_conv_bn, register_backbone, require


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class ResNet12Block(nn.Module):
    """3 x (conv3x3, BN), LeakyReLU, projection shortcut, max-pool, then dropout/DropBlock."""

    def __init__(self, cin: int, cout: int, drop_block: bool, block_size: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.conv3, self.bn3 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.dropblock = DropBlock(0.0, block_size) if drop_block else None

    def forward(self, x: torch.Tensor, drop_rate: float = 0.0) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.pool(self.act(out + self.shortcut(x)))
        if drop_rate > 0.0 and self.training:
            if self.dropblock is not None:
                out = self.dropblock(out, drop_rate)
            else:
                out = F.dropout(out, p=drop_rate, training=True)
        return out


def _forget_step_cache(module: nn.Module, _incompatible: object) -> None:
    module._steps = None


class ResNet12(nn.Module):
    """ResNet-12 embedding network; ``forward(images) -> [N, widths[-1]]``."""

    def __init__(
        self,
        in_channels: int = 3,
        widths: tuple[int, ...] = (64, 160, 320, 640),
        drop_rate: float = 0.1,
        dropblock_size: int = 5,
        dropblock_ramp_steps: int = 0,
    ) -> None:
        super().__init__()
        require(
            len(widths) == 4
            and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths),
            f"backbone 'resnet12': widths must be 4 positive ints, got {widths!r}",
        )
        require(
            0.0 <= drop_rate < 1.0,
            f"backbone 'resnet12': drop_rate must be in [0, 1), got {drop_rate!r}",
        )
        require(
            isinstance(dropblock_size, int) and dropblock_size >= 1,
            f"backbone 'resnet12': dropblock_size must be a positive int, got {dropblock_size!r}",
        )
        require(
            isinstance(dropblock_ramp_steps, int) and dropblock_ramp_steps >= 0,
            "backbone 'resnet12': dropblock_ramp_steps must be an int >= 0, "
            f"got {dropblock_ramp_steps!r}",
        )
        chans = [in_channels, *widths]
        self.blocks = nn.ModuleList(
            ResNet12Block(chans[i], chans[i + 1], drop_block=i >= 2, block_size=dropblock_size)
            for i in range(4)
        )
        self.drop_rate = float(drop_rate)
        self.dropblock_ramp_steps = dropblock_ramp_steps
        # Training steps seen: drives the ramp and is checkpointed with the weights.
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        # Host-side mirror of num_steps so the schedule never forces a GPU sync; it is
        # re-read from the buffer after load_state_dict.
        self._steps: int | None = None
        self.register_load_state_dict_post_hook(_forget_step_cache)
        self.out_dim = chans[-1]
        init_conv_bn(self, nonlinearity="leaky_relu")

    def set_train_step(self, step: int) -> None:
        """Set the global training step the next forward pass runs at (drives the ramp).

        Called by the trainer before every step, so the ramp follows the global step (also after
        a resume or under DDP) rather than however many forward passes this module happened to see.
        """
        if self.dropblock_ramp_steps <= 0:
            return
        step = int(step)
        if self._steps != step:
            self._steps = step
            self.num_steps.fill_(step)

    def current_drop_rate(self) -> float:
        """The DropBlock rate (blocks 3-4) this training step uses, ramped linearly when requested."""
        if self.dropblock_ramp_steps <= 0:
            return self.drop_rate
        if self._steps is None:
            self._steps = int(self.num_steps)
        frac = min(1.0, self._steps / self.dropblock_ramp_steps)
        return self.drop_rate * frac

    def block_rates(self) -> list[float]:
        """Per-block drop rates of the current training step: dropout (1-2) full, DropBlock (3-4) ramped."""
        ramped = self.current_drop_rate()
        return [ramped if block.dropblock is not None else self.drop_rate for block in self.blocks]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rates = [0.0] * len(self.blocks)
        if self.training:
            if self.drop_rate > 0.0:
                rates = self.block_rates()
            if self.dropblock_ramp_steps > 0:
                if self._steps is None:
                    self._steps = int(self.num_steps)
                self._steps += 1
                self.num_steps += 1
        x = images
        for block, rate in zip(self.blocks, rates):
            x = block(x, rate)
        return x.mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return (
            f"drop_rate={self.drop_rate}, dropblock_ramp_steps={self.dropblock_ramp_steps}, "
            f"out_dim={self.out_dim}"
        )


@register_backbone("resnet12")
def resnet12(
    in_channels: int = 3,
    image_size: int | None = None,
    drop_rate: float = 0.1,
    dropblock_size: int = 5,
    dropblock_ramp_steps: int = 0,
    widths: tuple[int, ...] = (64, 160, 320, 640),
) -> ResNet12:
    """ResNet-12 (64-160-320-640, 640-d). ``image_size`` is accepted and ignored (global pool)."""
    check_common("resnet12", in_channels, image_size)
    return ResNet12(in_channels, tuple(widths), drop_rate, dropblock_size, dropblock_ramp_steps)
