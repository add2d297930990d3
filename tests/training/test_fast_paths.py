"""Training with the GPU fast paths, on CPU: bf16-mixed precision (float32 weights, EMA and loss;
the losses follow float32's), ``module.compile`` (compiled once for every step, the same steps as
eager) and ``module.channels_last`` (the state dict stays the network's)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from scidiff.diffusion import GaussianDiffusion
from scidiff.diffusion.schedules import NoiseSchedule
from scidiff.nets import UNet
from scidiff.nets.execution import Execution
from scidiff.training import DiffusionModule
from tests.nets.test_execution import CountingBackend


class Fields(Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 16, 16, generator=g).cumsum(-1).cumsum(-2) / 8  # smooth-ish fields
        self.p = torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "params": self.p[i]}


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.dtypes: set[torch.dtype] = set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.dtypes.add(outputs["loss"].dtype)


def module(**kw) -> DiffusionModule:
    torch.manual_seed(0)
    net = UNet(1, dims=2, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
               head_channels=16, num_params=2)
    return DiffusionModule(net, GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000), prediction="v"),
                           lambda params: torch.optim.AdamW(params, lr=1e-3), cond_dropout=0.2, **kw)


def fit(m: DiffusionModule, steps: int, precision: str = "32-true") -> LossLog:
    log = LossLog()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[log])
    trainer.fit(m, DataLoader(Fields(), batch_size=8, shuffle=False, drop_last=True))
    return log


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_bf16_mixed_keeps_float32_weights_ema_and_loss_and_follows_float32():
    """30 steps: the loss is float32 at every step, the weights and their EMA stay float32, and the
    loss curve stays within 2 % of float32's on average (bf16 rounds at 0.4 %; the 200-step
    quickstart comparison is on the docs' mixed-precision page)."""
    ref = fit(module(), 30)
    m = module()
    bf16 = fit(m, 30, precision="bf16-mixed")
    assert bf16.dtypes == {torch.float32}
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert int(m.ema.num_updates) == 30
    drift = sum(abs(a / b - 1) for a, b in zip(bf16.losses, ref.losses)) / len(ref.losses)
    assert 0 < drift < 0.02
    assert abs(sum(bf16.losses[-10:]) / sum(ref.losses[-10:]) - 1) < 0.02


def test_compiled_training_compiles_once_and_takes_the_eager_steps():
    backend = CountingBackend()
    ref = fit(module(), 12)
    m = module(compile=True)
    m.execution = Execution(compile=True, backend=backend)  # the counting backend instead of inductor
    compiled = fit(m, 12)
    assert backend.graphs == 1  # forward and backward of every step: one graph, compiled at the first
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
    assert set(m.state_dict()) == set(module().state_dict())


def test_channels_last_training_keeps_the_state_dict_and_the_steps():
    ref = fit(module(), 8)
    m = module(channels_last=True)
    fast = fit(m, 8)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5)
    assert set(m.state_dict()) == set(module().state_dict())
    conv = m.denoiser.input_conv.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert m.ema.model.input_conv.conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("bad,match", [({"compile": "fastest"}, r"module\.compile: expected true, false"),
                                       ({"channels_last": 1}, r"module\.channels_last: expected true or false")])
def test_bad_settings_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        module(**bad)
