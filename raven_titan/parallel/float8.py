"""float8 training through torchao: the first converter applied to the model (before activation
checkpointing, compile and FSDP). On CPU it runs for correctness only (real fp8 GEMMs, slower than bf16);
speed needs an SM89+ GPU (H100/H200)."""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger("raven_titan")


def _keep_high_precision(cfg, module: nn.Module, fqn: str) -> bool:
    if any(f in fqn for f in cfg.filter_fqns):
        return True
    # float8 GEMMs need both dimensions divisible by 16
    return isinstance(module, nn.Linear) and (module.in_features % 16 or module.out_features % 16)


def apply_float8(model: nn.Module, cfg) -> nn.Module:
    """Swap eligible nn.Linear modules for torchao's Float8Linear (parameter names unchanged)."""
    if not cfg.enable:
        return model
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if cfg.recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=cfg.enable_fsdp_float8_all_gather)
    else:
        config = Float8LinearConfig.from_recipe_name(cfg.recipe)
    converted = []

    def keep(module: nn.Module, fqn: str) -> bool:
        ok = isinstance(module, nn.Linear) and not _keep_high_precision(cfg, module, fqn)
        if ok:
            converted.append(fqn)
        return ok

    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    logger.info("float8 (%s): %d linear layers converted", cfg.recipe, len(converted))
    return model


def precompute_scales(model: nn.Module, cfg) -> None:
    """After each optimizer step: one all-reduce of every weight's amax for float8 all-gathers under FSDP."""
    if cfg.enable and cfg.enable_fsdp_float8_all_gather and cfg.precompute_float8_dynamic_scale_for_fsdp:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
