"""Name-based parameter groups (Huginn's `get_param_groups`, reference spec §5.5) and the optimizer factory.

Groups, in the order Huginn used: ``weights`` (2-D and larger tensors: projections, MLP, adapter),
``embedding`` (names containing ``wte`` or ``lm_head``; weight decay on), ``norm_bias`` (names containing
``norm``, ``ln_f`` or ``bias``, ``qk_bias`` included; weight decay 0 when asked). A tied embedding/head
weight is one ``nn.Parameter`` and appears once: ``named_parameters()`` de-duplicates it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raven_titan.errors import RavenError
from raven_titan.optim.ellis_adam import ELLISAdam

if TYPE_CHECKING:
    from raven_titan.config.job_config import Optimizer as OptimizerConfig

__all__ = ["build_param_groups", "build_optimizer"]

_EMBEDDING_KEYS = ("wte", "lm_head")
_NORM_BIAS_KEYS = ("norm", "ln_f", "bias")


def _group_of(name: str, param: torch.Tensor) -> str:
    if any(key in name for key in _EMBEDDING_KEYS):
        return "embedding"
    if any(key in name for key in _NORM_BIAS_KEYS):
        return "norm_bias"
    if param.ndim >= 2:
        return "weights"
    raise RavenError(
        f"parameter '{name}' (shape {tuple(param.shape)}) fits no optimizer group: name it with "
        f"{'/'.join(_EMBEDDING_KEYS)} (embedding) or {'/'.join(_NORM_BIAS_KEYS)} (no weight decay), "
        "or make it a >= 2-D weight, or add its group in raven_titan/optim/param_groups.py"
    )


def build_param_groups(
    model: nn.Module, weight_decay: float, no_weight_decay_for_bias_and_norm: bool
) -> list[dict[str, Any]]:
    """Split the trainable parameters of `model` into named groups (``"name"`` key), empty groups omitted.

    Parameters with ``requires_grad=False`` are left out. Raises RavenError naming any parameter that fits
    no group (a 1-D tensor that is neither a norm gain nor a bias).
    """
    buckets: dict[str, list[nn.Parameter]] = {"weights": [], "embedding": [], "norm_bias": []}
    for name, param in model.named_parameters():  # de-duplicates shared (tied) parameters
        if param.requires_grad:
            buckets[_group_of(name, param)].append(param)
    decay = {
        "weights": weight_decay,
        "embedding": weight_decay,
        "norm_bias": 0.0 if no_weight_decay_for_bias_and_norm else weight_decay,
    }
    return [
        {"name": name, "params": params, "weight_decay": decay[name]}
        for name, params in buckets.items()
        if params
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer named by `cfg` (the ``[optimizer]`` section) over `build_param_groups(model, ...)`.

    Every group starts at the peak LR ``cfg.lr``; the LR scheduler scales all groups alike.
    """
    groups = build_param_groups(model, cfg.weight_decay, cfg.no_weight_decay_for_bias_and_norm)
    if not groups:
        raise RavenError("the model has no trainable parameters: nothing to optimize")
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "AdamW":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "ELLISAdam":
        return ELLISAdam(
            groups,
            lr=cfg.lr,
            betas=betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            update_clipping=cfg.update_clipping,
            atan_adam=cfg.atan_adam,
            running_init=cfg.running_init,
            decouple_wd=cfg.decouple_wd,
        )
    raise RavenError(f"optimizer.name '{cfg.name}' is unknown: use AdamW or ELLISAdam")
