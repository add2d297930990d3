"""LoRA adapters on the denoisers (peft), in 1-D, 2-D and 3-D, UNet and DiT: the adapted model
starts as the base model, only adapters (and the named modules) train, merging is exact, the
adapter state round-trips, and targets that match nothing are refused by name."""

from __future__ import annotations

import pytest
import torch

from scidiff.conditioning import Conditioning
from scidiff.nets import DiT, UNet
from scidiff.nets.adapters import (
    LoraSpec,
    adapter_state,
    apply_lora,
    load_adapter_state,
    merge_lora,
    target_names,
    unmerge_lora,
)

pytest.importorskip("peft")


def nets():
    return [
        UNet(1, 1, model_channels=16, channel_mult=[1, 2], attention_levels=[1], head_channels=16, num_params=2),
        UNet(2, 2, model_channels=16, channel_mult=[1, 2], attention_levels=[1], head_channels=16, num_params=2),
        UNet(1, 3, model_channels=16, channel_mult=[1, 2], attention_levels=[1], head_channels=16, num_params=2),
        DiT(1, 2, num_params=2, hidden_size=32, depth=2, num_heads=4, patch_size=2),
        DiT(2, 3, num_params=2, hidden_size=32, depth=2, num_heads=4, patch_size=2),
    ]


def randomised(net):
    """Random base weights: the zero-initialised output layers would hide every difference."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


def inputs(net):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, net.in_channels, *([8] * net.dims), generator=g)
    return x, torch.tensor([3, 700]), Conditioning(params=torch.randn(2, 2, generator=g))


@pytest.mark.parametrize("index", range(5), ids=["unet1d", "unet2d", "unet3d", "dit2d", "dit3d"])
def test_lora_starts_as_the_base_trains_only_adapters_and_merges_exactly(index):
    net = randomised(nets()[index])
    x, t, cond = inputs(net)
    with torch.no_grad():
        base = net(x, t, cond)
    targets = ("convolutions", "attention") if isinstance(net, UNet) else ("attention", "mlp", "modulation")
    counts = apply_lora(net, LoraSpec(rank=2, alpha=4.0, targets=targets, train=("param_embedding",)))
    with torch.no_grad():
        # B = 0: the base model, up to float32 rounding (peft's 1-D convolution path sums in another order)
        torch.testing.assert_close(net(x, t, cond), base, rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("cond_embed.params") for n in trainable)
    assert counts["trainable"] == sum(p.numel() for p in net.parameters() if p.requires_grad) < counts["total"] / 2
    net.eval()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
        adapted = net(x, t, cond)
        assert (adapted - base).abs().max() > 1e-3
        merge_lora(net)
        merged = net(x, t, cond)
        unmerge_lora(net)
        torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net(x, t, cond), adapted, rtol=1e-4, atol=1e-5)
    spec = LoraSpec(rank=2, alpha=4.0, targets=targets, train=("param_embedding",))
    state = adapter_state(net, spec)
    fresh = randomised(nets()[index])
    apply_lora(fresh, spec)
    load_adapter_state(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, cond), adapted, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_adapters():
    net = randomised(nets()[1]).train()
    apply_lora(net, LoraSpec(rank=2, targets=("convolutions",)))
    x, t, cond = inputs(net)
    net(x, t, cond).square().mean().backward()
    assert all(p.grad is None for n, p in net.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if "lora_B" in n)  # B starts at 0: A gets none yet


def test_targets_that_match_nothing_and_bad_settings_are_refused_by_name():
    unet = nets()[1]
    with pytest.raises(ValueError, match=r"finetune.lora.targets: \['mlp'\] match no layer of the UNet"):
        target_names(unet, LoraSpec(targets=("mlp",)))
    with pytest.raises(ValueError, match="finetune.lora.targets: unknown role 'convs'"):
        LoraSpec(targets=("convs",))
    with pytest.raises(ValueError, match="finetune.lora.rank: expected a positive integer"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="finetune.lora.train: unknown module"):
        LoraSpec(train=("decoder",))
    with pytest.raises(ValueError, match="finetune.lora.train: 'embedding' matches no module"):
        apply_lora(nets()[1], LoraSpec(train=("embedding",)))  # no embedding_dim: no such module
