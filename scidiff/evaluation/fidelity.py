"""Conditional fidelity: how well generated members match the condition they were generated for.

The analogue of a CLIP score, with a contrastive field encoder trained by ``scidiff-train
stage=contrastive`` (:mod:`scidiff.nets.contrastive`; ``fidelity.encoder`` of
``scidiff-evaluate``). Each member and each real held-out field is encoded, and so is each
condition of the evaluation (its physical parameters and/or embedding). Reported:

* ``fidelity/similarity``: the mean cosine similarity of a member with its own condition;
* ``fidelity/top1``, ``fidelity/top5``: how often a member's own condition is the most similar
  (among the five most similar) of the evaluation's distinct conditions, ``fidelity/candidates``
  of them (chance: ``k / candidates``);
* ``fidelity/real_similarity``, ``fidelity/real_top1``, ``fidelity/real_top5``: the same for the
  real held-out fields: the floor a faithful model reaches, since the encoder is imperfect;
* ``<each of these>_se``: its standard error over the evaluated samples (conditions), the unit
  both are drawn in: the members of one sample share its condition and are not independent. The
  real fields' figures rest on one field per sample and are the noisier: with 64 samples, a top-1
  of 0.15 is known to about +-0.045.

A model that ignores its condition scores at chance; one that follows it as the data do scores
like the real fields. Every rank's vectors are gathered before the accuracies are computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from scidiff.evaluation.checks import check_string_or_none
from scidiff.nets.contrastive import distinct_keys, retrieval_hits


@dataclass(frozen=True)
class FidelitySettings:
    """Args: encoder (a contrastive encoder run: its directory, checkpoint, run id, ``runs:/`` or
    ``models:/``; ``None``: no fidelity); tracking_uri (its MLflow store, for run ids)."""

    encoder: str | None = None
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        check_string_or_none("fidelity.encoder", self.encoder)
        check_string_or_none("fidelity.tracking_uri", self.tracking_uri)

    @property
    def enabled(self) -> bool:
        return self.encoder is not None


class ConditionFidelity:
    """Collects the encoded members, real fields and conditions batch by batch (:meth:`update`),
    then computes the scores (:meth:`results`) over every rank's samples."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.rows: dict[str, list[np.ndarray]] = {"members": [], "real": [], "cond": [], "raw": []}

    def update(self, ens_phys: Tensor, x_phys: Tensor, params_phys: Tensor | None,
               embedding_phys: Tensor | None) -> None:
        """``ens_phys [B, M, C, *S]``, ``x_phys [B, C, *S]`` and the conditions in physical units."""
        b, m = ens_phys.shape[:2]
        members = self.encoder.embed_fields(ens_phys.flatten(0, 1).cpu()).reshape(b, m, -1)
        real = self.encoder.embed_fields(x_phys.cpu())
        cond = self.encoder.embed_conditions(None if params_phys is None else params_phys.cpu(),
                                             None if embedding_phys is None else embedding_phys.cpu())
        raw = torch.cat([t.double().cpu() for t in (params_phys, embedding_phys) if t is not None], dim=1)
        for key, value in (("members", members), ("real", real), ("cond", cond), ("raw", raw)):
            self.rows[key].append(value.double().numpy())

    def results(self, ctx) -> dict[str, float]:
        local = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in self.rows.items()}
        parts = ctx.gather(local)
        merged = {k: torch.from_numpy(np.concatenate([p[k] for p in parts if p[k].size])) for k in local}
        z_keys, index = distinct_keys(merged["raw"], merged["cond"])
        members, real = merged["members"], merged["real"]
        n, m = members.shape[:2]
        own = z_keys[index]
        gen = retrieval_hits(members.reshape(n * m, -1), z_keys, index.repeat_interleave(m))
        truth = retrieval_hits(real, z_keys, index)
        per_sample = {  # [N] each: a sample's members pooled, so that the error is over conditions
            "similarity": (members * own[:, None]).sum(-1).mean(1),
            "top1": gen[1].double().reshape(n, m).mean(1), "top5": gen[5].double().reshape(n, m).mean(1),
            "real_similarity": (real * own).sum(-1), "real_top1": truth[1].double(), "real_top5": truth[5].double(),
        }
        out = {}
        for name, values in per_sample.items():
            out[f"fidelity/{name}"] = float(values.mean())
            out[f"fidelity/{name}_se"] = float(values.std() / math.sqrt(n)) if n > 1 else math.nan
        out["fidelity/candidates"] = float(len(z_keys))
        return out


__all__ = ["ConditionFidelity", "FidelitySettings"]
