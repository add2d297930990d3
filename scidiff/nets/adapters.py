"""Low-rank adapters (LoRA, Hu et al. 2021) for the denoisers, through the ``peft`` library.

A LoRA adapter adds to a frozen layer ``W`` a trainable low-rank update ``(alpha / r) B A``
(``A``: ``r x in``, ``B``: ``out x r``, ``B`` zero at the start, so the adapted model starts
as the base model). peft implements it for ``nn.Linear`` and for convolutions of rank 1, 2
and 3; this module chooses which layers of a scidiff denoiser get one, by role:

=================  ==================================================================
``convolutions``   every convolution (the UNet's, the DiT's patch embedding)
``attention``      the attention projections (``qkv``, ``proj``) of the UNet and the DiT
``mlp``            the DiT blocks' MLPs
``modulation``     the layers that turn the time/condition embedding into scales and shifts
                   (the UNet's ``emb``, the DiT's ``ada`` and ``final_ada``)
=================  ==================================================================

``train`` names modules trained in full instead (e.g. ``param_embedding``, the MLP of the
physical parameters, for a new parameter range). Everything else is frozen.

:func:`apply_lora` injects the adapters (``peft.inject_adapter_in_model``); :func:`adapter_state`
is what an adapter file holds; :func:`merge_lora` folds the updates into the base weights
(the model then runs at the base model's speed) and :func:`unmerge_lora` takes them out again.
Torch and peft only.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

ROLES = ("convolutions", "attention", "mlp", "modulation")
FULL = {"param_embedding": r"cond_embed\.params\b", "time_embedding": r"cond_embed\.time\b",
        "embedding": r"cond_embed\.vector\b"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _role(name: str, module: nn.Module) -> str | None:
    last = name.rsplit(".", 1)[-1]
    if isinstance(module, _CONV):
        return "convolutions"
    if not isinstance(module, nn.Linear):
        return None
    if last in ("qkv", "proj"):
        return "attention"
    if re.search(r"\.mlp\.\d+$", name) and not name.startswith("cond_embed"):
        return "mlp"
    if last in ("emb", "ada", "final_ada"):
        return "modulation"
    return None


@dataclass(frozen=True)
class LoraSpec:
    """What a LoRA fine-tuning adapts (``finetune.lora`` in a config).

    Args:
        rank: ``r``, the rank of each update.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter's input.
        targets: the roles (module docstring) whose layers get an adapter.
        train: modules trained in full: ``param_embedding``, ``time_embedding``, ``embedding``.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("convolutions", "attention")
    train: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"finetune.lora.rank: expected a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"finetune.lora.alpha: expected a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"finetune.lora.dropout: expected a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "train", tuple(self.train))
        if not self.targets:
            raise ValueError(f"finetune.lora.targets: expected some of {list(ROLES)}, got none")
        for t in self.targets:
            if t not in ROLES:
                raise ValueError(f"finetune.lora.targets: unknown role {t!r}; expected some of {list(ROLES)}")
        for t in self.train:
            if t not in FULL:
                raise ValueError(f"finetune.lora.train: unknown module {t!r}; expected some of {list(FULL)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d, "targets": list(self.targets), "train": list(self.train)}


def target_names(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The full names of the layers that get an adapter (``ValueError`` naming
    ``finetune.lora.targets`` when a role matches no layer of ``model``)."""
    names = []
    found = set()
    for name, module in model.named_modules():
        role = _role(name, module)
        if role in spec.targets and not any(re.match(p, name) for p in (FULL[t] for t in spec.train)):
            names.append(name)
            found.add(role)
    missing = [t for t in spec.targets if t not in found]
    if missing:
        raise ValueError(f"finetune.lora.targets: {missing} match no layer of the {type(model).__name__} "
                         f"(it has {sorted({r for n, m in model.named_modules() if (r := _role(n, m))})})")
    return names


def apply_lora(model: nn.Module, spec: LoraSpec) -> dict[str, int]:
    """Inject the adapters of ``spec`` into ``model`` in place and freeze everything but them and
    the ``train`` modules; returns ``{"trainable": n, "total": n}`` parameter counts."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA adapters need the peft library: pip install 'scidiff[adapt]'") from None

    names = target_names(model, spec)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names,
                        bias="none")
    inject_adapter_in_model(config, model)
    full = [re.compile(FULL[t]) for t in spec.train]
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or any(r.match(name) for r in full))
    for t, pattern in zip(spec.train, full):
        if not any(pattern.match(n) for n, _ in model.named_parameters()):
            raise ValueError(f"finetune.lora.train: {t!r} matches no module of the {type(model).__name__}")
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def adapter_state(model: nn.Module, spec: LoraSpec) -> dict[str, Tensor]:
    """The adapter's weights (and the fully trained modules'): what an adapter file holds."""
    full = [re.compile(FULL[t]) for t in spec.train]
    return {n: p.detach().cpu().contiguous() for n, p in model.state_dict().items()
            if "lora_" in n or any(r.match(n) for r in full)}


def load_adapter_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load :func:`adapter_state` into a model with the same adapters (``ValueError`` when a
    key is missing or has another shape)."""
    own = model.state_dict()
    missing = [k for k in own if "lora_" in k and k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise ValueError(f"the adapter does not fit the model: {len(missing)} adapter weights missing "
                         f"({missing[:2]}), {len(extra)} unknown ({extra[:2]})")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"the adapter does not fit the model: {k} has shape {tuple(v.shape)}, "
                             f"the model's {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


def _lora_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The model's LoRA layers. Only peft makes them, so where peft was never imported there are
    none: a model without adapters is loaded without peft (an optional dependency, and a 3 s import)."""
    lora = sys.modules.get("peft.tuners.lora")
    if lora is None:
        return []
    return [m for m in model.modules() if isinstance(m, lora.LoraLayer)]


def _delta(layer: nn.Module, name: str) -> Tensor:
    """``scale * B A`` as a weight of the base layer: for a convolution, ``A`` holds the kernel and
    ``B`` is 1-wide, so ``delta[o, i, ...] = scale * sum_r B[o, r] A[r, i, ...]`` at any rank.
    (peft's own ``merge`` mis-shapes 1-wide 3-D kernels, the UNet's skip convolutions.)"""
    a = layer.lora_A[name].weight
    b = layer.lora_B[name].weight.reshape(layer.lora_B[name].weight.shape[0], -1)
    delta = torch.einsum("or,ri...->oi...", b.to(torch.float64), a.to(torch.float64))
    return (layer.scaling[name] * delta).to(layer.get_base_layer().weight.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter's update into its base layer's weights (inference at base speed)."""
    for layer in _lora_layers(model):
        for name in layer.active_adapters:
            if name in layer.lora_A and name not in layer.merged_adapters:
                layer.get_base_layer().weight += _delta(layer, name)
                layer.merged_adapters.append(name)


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Take merged updates out of the base weights again."""
    for layer in _lora_layers(model):
        while layer.merged_adapters:
            name = layer.merged_adapters.pop()
            layer.get_base_layer().weight -= _delta(layer, name)


__all__ = ["FULL", "ROLES", "LoraSpec", "adapter_state", "apply_lora", "load_adapter_state", "merge_lora",
           "target_names", "unmerge_lora"]
