"""ControlNet on the UNet and the DiT, in 1-D, 2-D and 3-D: at initialisation it is exactly the base model,
after training steps the new field changes the output (scale 0 gives the base back), only the
control branch trains, and the null condition of guidance drops the new field."""

from __future__ import annotations

import pytest
import torch

from scidiff.conditioning import Conditioning
from scidiff.nets import DiT, UNet
from scidiff.nets.controlnet import ControlNet


def base_net(kind: str, dims: int, field_channels: int) -> UNet | DiT:
    torch.manual_seed(0)
    if kind == "dit":
        net = DiT(2, dims, patch_size=2, hidden_size=32, depth=3, num_heads=4, num_params=2,
                  field_channels=field_channels)
    else:
        net = UNet(2, dims, model_channels=16, channel_mult=[1, 2], attention_levels=[1], head_channels=16,
                   num_params=2, field_channels=field_channels, padding="circular")
    with torch.no_grad():
        for p in net.parameters():  # a "trained" base: the zero-initialised output would hide everything
            p.normal_(0, 0.1)
    return net.eval()


def inputs(dims: int, base_fields: int, control: int = 1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, *([8] * dims), generator=g)
    fields = torch.randn(3, base_fields + control, *([8] * dims), generator=g)
    return x, torch.tensor([5, 300, 900]), torch.randn(3, 2, generator=g), fields


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("base_fields", [0, 2])
def test_at_initialisation_the_controlnet_is_exactly_the_base(kind, dims, base_fields):
    # frozen, as a loaded checkpoint is (and as the ControlNet holds it): on CPU, torch may pick another
    # convolution kernel for weights that require gradients, which changes the last bits in 1-D
    base = base_net(kind, dims, base_fields).requires_grad_(False)
    x, t, params, fields = inputs(dims, base_fields)
    with torch.no_grad():
        expected = base(x, t, Conditioning(params=params, fields=fields[:, :base_fields] if base_fields else None))
        net = ControlNet(base, control_channels=1).eval()
        got = net(x, t, Conditioning(params=params, fields=fields))
    assert torch.equal(got, expected)  # bit for bit: every added term is an exact zero


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_new_field_steers_the_output_and_only_the_control_branch_trains(kind, dims):
    base = base_net(kind, dims, 0)
    net = ControlNet(base, control_channels=1)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("base.") for n in trainable)
    x, t, params, fields = inputs(dims, 0)
    net.train()
    net(x, t, Conditioning(params=params, fields=fields)).square().mean().backward()
    assert all(p.grad is None for n, p in net.named_parameters() if n.startswith("base."))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if n.startswith("zero."))
    with torch.no_grad():  # as after some training: the zero layers have moved
        for module in (*net.zero, net.hint[-1]):
            for p in module.parameters():
                p.normal_(0, 0.1)
    net.eval()
    with torch.no_grad():
        a = net(x, t, Conditioning(params=params, fields=fields))
        b = net(x, t, Conditioning(params=params, fields=-fields))
        assert (a - b).abs().max() > 1e-3
        net.scale = 0.0
        torch.testing.assert_close(net(x, t, Conditioning(params=params, fields=fields)),
                                   base(x, t, Conditioning(params=params)), rtol=0, atol=0)
        net.scale = 1.0
        drop = torch.ones(3, dtype=torch.bool)  # guidance's null condition: the new field is dropped too
        torch.testing.assert_close(net(x, t, Conditioning(params=params, fields=fields, drop=drop)),
                                   net(x, t, Conditioning(params=params, fields=-fields, drop=drop)))


def test_wrong_condition_channels_and_denoisers_are_refused_by_name():
    base = base_net("unet", 2, 2)
    net = ControlNet(base, control_channels=1)
    x, t, params, fields = inputs(2, 2)
    with pytest.raises(ValueError, match=r"cond.fields: the ControlNet needs 2 base \+ 1 control channels, got 2"):
        net(x, t, Conditioning(params=params, fields=fields[:, :2]))
    with pytest.raises(ValueError, match="control_channels|needs >= 1 channel"):
        ControlNet(base, control_channels=0)
    with pytest.raises(ValueError, match="needs a UNet or DiT denoiser"):
        ControlNet(torch.nn.Linear(2, 2), control_channels=1)
    with pytest.raises(ValueError, match=r"finetune.controlnet.blocks: only for a DiT"):
        ControlNet(base, control_channels=1, blocks=2)
    with pytest.raises(ValueError, match=r"finetune.controlnet.blocks: expected 1..3"):
        ControlNet(base_net("dit", 2, 0), control_channels=1, blocks=4)


def test_the_dit_branch_copies_the_first_blocks():
    net = ControlNet(base_net("dit", 2, 0), control_channels=1, blocks=2)
    assert len(net.blocks) == len(net.zero) == 2
    for copy, original in zip(net.blocks, net.base.blocks):
        assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), original.state_dict().values()))
    assert len(ControlNet(base_net("dit", 2, 0), control_channels=1).blocks) == 1   # half the depth (3 // 2)
