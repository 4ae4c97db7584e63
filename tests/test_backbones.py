"""Backbones: shapes, gradient flow, modes, parameter counts, DropBlock, registry errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowshot.backbones import DropBlock, create_backbone, drop_block, list_backbones
from lowshot.backbones.dropblock import seed_probability
from lowshot.errors import ConfigError

ALL = list_backbones()


def test_expected_backbones_registered() -> None:
    expected = {
        "conv4",
        "conv6",
        "resnet10",
        "resnet12",
        "resnet18",
        "resnet50",
        "resnext50_32x4d",
        "wrn28_10",
    }
    assert expected <= set(ALL)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", ALL)
def test_output_shape_eval(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    # 16 px is the smallest size every backbone accepts (conv4's 4 pools); it keeps the
    # 25-36M-parameter nets fast on CPU.
    net = create_backbone(name, in_channels=in_channels, image_size=16).eval()
    with torch.no_grad():
        out = net(torch.randn(2, in_channels, 16, 16))
    assert out.shape == (2, net.out_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(1)
    net = create_backbone(name, in_channels=3, image_size=16).train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    net(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [
        n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing, f"no/invalid gradient for {missing[:5]}"


@pytest.mark.parametrize("name", ["conv4", "resnet12", "resnet18", "wrn28_10"])
def test_train_and_eval_modes(name: str) -> None:
    torch.manual_seed(2)
    net = create_backbone(name, image_size=16)
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(3, 3, 16, 16)
    net.eval()
    before = bn.running_mean.clone()
    with torch.no_grad():
        a, b = net(x), net(x)
    torch.testing.assert_close(a, b)  # eval: deterministic, running stats untouched
    torch.testing.assert_close(bn.running_mean, before)
    net.train()
    with torch.no_grad():
        net(x)
    assert not torch.equal(bn.running_mean, before)  # train: batch statistics are tracked


def test_conv4_output_sizes() -> None:
    assert create_backbone("conv4").out_dim == 1600  # default image_size 84
    assert create_backbone("conv4", image_size=84).out_dim == 1600
    assert create_backbone("conv4", in_channels=1, image_size=28).out_dim == 64
    assert create_backbone("conv6", image_size=84).out_dim == 1600
    net = create_backbone("conv4", in_channels=1, image_size=28).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 64)
        assert create_backbone("conv4").eval()(torch.randn(1, 3, 84, 84)).shape == (1, 1600)
    avg = create_backbone("conv4", pool="avg", hidden=32).eval()
    assert avg.out_dim == 32
    with torch.no_grad():
        assert avg(torch.randn(1, 3, 50, 50)).shape == (1, 32)
    with pytest.raises(ConfigError, match="image_size=84"):
        create_backbone("conv4").eval()(torch.randn(1, 3, 28, 28))
    with pytest.raises(ConfigError, match="too small"):
        create_backbone("conv4", image_size=8)


def test_resnet12_is_640d_at_84px() -> None:
    net = create_backbone("resnet12").eval()
    assert net.out_dim == 640
    with torch.no_grad():
        assert net(torch.randn(1, 3, 84, 84)).shape == (1, 640)


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(3)
    for name in ("conv4", "resnet12", "resnet18"):
        net = create_backbone(name, image_size=16).eval()
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            ref = net(x)
            out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# Published totals minus the 1000-way fc (512*1000+1000 or 2048*1000+1000): torchvision's
# resnet18 11,689,512 / resnet34 21,797,672 / resnet50 25,557,032 / resnext50_32x4d
# 25,028,904; WRN-28-10 36,479,194 with its 10-way fc (640*10+10); MetaOptNet ResNet-12
# 12.4M; Conv-4 (64 ch) 113,088; ResNet-10 = BasicBlock [1,1,1,1].
PARAM_COUNTS = {
    "conv4": 113_088,
    "resnet10": 4_905_792,
    "resnet12": 12_424_320,
    "resnet18": 11_689_512 - 513_000,
    "resnet34": 21_797_672 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
    "resnext50_32x4d": 25_028_904 - 2_049_000,
    "wrn28_10": 36_479_194 - 6_410,
}


@pytest.mark.parametrize("name,count", sorted(PARAM_COUNTS.items()))
def test_parameter_counts(name: str, count: int) -> None:
    net = create_backbone(name)
    assert sum(p.numel() for p in net.parameters()) == count


def test_resnet_stem_choice() -> None:
    assert create_backbone("resnet18", image_size=32).stem[0].kernel_size == (3, 3)
    assert create_backbone("resnet18", image_size=84).stem[0].kernel_size == (7, 7)
    assert create_backbone("resnet18").stem[0].kernel_size == (7, 7)
    assert create_backbone("resnet18", image_size=32, small_input=False).stem[0].kernel_size == (
        7,
        7,
    )
    assert create_backbone("resnet50", image_size=224).out_dim == 2048


# ---------------------------------------------------------------- DropBlock


def _expected_drop_fraction(rate: float, bs: int, h: int, w: int) -> float:
    """Exact E[dropped fraction]: unit u is dropped unless all k(u) covering seeds are off."""
    gamma = seed_probability(rate, bs, h, w)
    valid = torch.ones(1, 1, h - bs + 1, w - bs + 1, dtype=torch.float64)
    k = F.conv2d(F.pad(valid, (bs - 1,) * 4), torch.ones(1, 1, bs, bs, dtype=torch.float64))
    return float((1 - (1 - gamma) ** k).mean())


def test_dropblock_identity_in_eval_and_at_rate_zero() -> None:
    x = torch.randn(4, 3, 12, 12)
    layer = DropBlock(0.3, 5).eval()
    assert layer(x) is x
    assert DropBlock(0.0, 5).train()(x) is x


@pytest.mark.parametrize("rate,bs,size", [(0.1, 5, 20), (0.3, 3, 10), (0.2, 5, 5)])
def test_dropblock_fraction_and_scale(rate: float, bs: int, size: int) -> None:
    torch.manual_seed(4)
    x = torch.ones(64, 64, size, size)
    out = DropBlock(rate, bs).train()(x)
    dropped = (out == 0).double().mean().item()
    expected = _expected_drop_fraction(rate, bs, size, size)
    # ~independent blocks: 64*64 maps x (size/bs)^2 blocks each; allow 5 standard errors.
    n_blocks = 64 * 64 * max(1.0, (size / bs) ** 2)
    assert abs(dropped - expected) < 5 * (expected * (1 - expected) / n_blocks) ** 0.5, (
        dropped,
        expected,
    )
    assert abs(expected - rate) < 0.35 * rate  # gamma is calibrated to ~rate
    # Kept units are rescaled so the activation sum (hence the mean) is preserved.
    torch.testing.assert_close(out.mean(), torch.tensor(1.0))
    kept = out[out != 0]
    torch.testing.assert_close(
        kept, torch.full_like(kept, 1.0 / (1.0 - dropped)), rtol=1e-4, atol=0
    )


def test_dropblock_drops_whole_blocks() -> None:
    torch.manual_seed(5)
    # With a 5x5 map and block 5 there is one possible block: each map is all-or-nothing.
    out = drop_block(torch.ones(2000, 1, 5, 5), 0.3, 5)
    per_map = (out == 0).flatten(1).float().mean(1)
    assert set(per_map.unique().tolist()) <= {0.0, 1.0}
    assert abs(per_map.mean().item() - 0.3) < 0.04
    # Block larger than the map is clamped to the map (late ResNet-12 stages on small inputs).
    assert torch.isfinite(drop_block(torch.ones(8, 4, 2, 2), 0.5, 5)).all()


def test_resnet12_dropblock_active_only_in_training_and_ramps() -> None:
    torch.manual_seed(6)
    small = {"widths": (8, 8, 16, 16)}  # the schedule does not depend on width; keep it fast
    net = create_backbone("resnet12", drop_rate=0.1, dropblock_ramp_steps=4, **small)
    assert net.current_drop_rate() == 0.0
    x = torch.randn(2, 3, 32, 32)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(x)
    assert net.current_drop_rate() == pytest.approx(0.05)
    state = net.state_dict()
    restored = create_backbone("resnet12", drop_rate=0.1, dropblock_ramp_steps=4, **small)
    restored.load_state_dict(state)
    assert restored.current_drop_rate() == pytest.approx(0.05)
    with torch.no_grad():
        for _ in range(5):
            net(x)
    assert net.current_drop_rate() == pytest.approx(0.1)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))
    plain = create_backbone("resnet12", drop_rate=0.3, **small).train()
    torch.manual_seed(7)
    with torch.no_grad():
        assert not torch.equal(plain(x), plain(x))  # stochastic in training


def test_unknown_backbone_and_option() -> None:
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        create_backbone("resnet81")
    with pytest.raises(ConfigError, match="'hidden'"):
        create_backbone("resnet18", hidden=32)
    with pytest.raises(ConfigError, match="in_channels"):
        create_backbone("conv4", in_channels=0)
    with pytest.raises(ConfigError, match="drop_rate"):
        create_backbone("resnet12", drop_rate=1.5)


def _record_block_rates(net: torch.nn.Module) -> list[list[float]]:
    """Spy on the rate each ResNet-12 block receives; one list per forward pass."""
    seen: list[list[float]] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if module is net.blocks[0]:
            seen.append([])
        seen[-1].append(float(args[1]))

    for block in net.blocks:
        block.register_forward_pre_hook(hook)
    return seen


def test_resnet12_ramp_is_dropblock_only_and_follows_the_global_step() -> None:
    """bl0 lib/backbone/resnet12.py:62-69: only the DropBlock branch (blocks 3-4) ramps from 0 over
    the ramp; the dropout of blocks 1-2 runs at the full rate from step 0."""
    torch.manual_seed(0)
    net = create_backbone("resnet12", drop_rate=0.1, dropblock_ramp_steps=4, widths=(4, 4, 8, 8)).train()
    seen = _record_block_rates(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net(x)                      # step 0 (fresh)
        net.set_train_step(2)
        net(x)                      # global step 2
        net(x)                      # step 3 (forward passes count on from the set step)
        net.set_train_step(40)
        net(x)
    assert seen[0] == pytest.approx([0.1, 0.1, 0.0, 0.0])
    assert seen[1] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    assert seen[2] == pytest.approx([0.1, 0.1, 0.075, 0.075])
    assert seen[3] == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert int(net.state_dict()["num_steps"]) == 41  # the step after the last one, checkpointed
