"""Model registry: `model.name` -> ModelSpec (args class, flavors, builder, counting, and the hooks that
parallelism and Hugging Face export fill in)."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from raven_titan.errors import RavenError


@dataclass
class ModelSpec:
    name: str
    args_cls: type
    flavors: dict[str, Any]
    build: Callable[[Any], nn.Module]
    """Construct the model from args under the current device context (use the meta device, then init)."""
    num_params: Callable[[Any], dict[str, int]]
    flops_per_token: Callable[..., float]
    """(args, seq_len, n, k, ac_mode) -> training FLOPs per token for one realised depth."""
    sample_depth: Callable[[Any, int, int], tuple[int, int]] | None = None
    """(args, seed, step) -> (n no-grad iterations, k grad iterations); None for non-recurrent models."""
    expected_depth: Callable[[Any], tuple[float, float]] | None = None
    parallelize: Callable[..., nn.Module] | None = None
    """Hook for the distributed layer (FSDP2 / data parallel); None = single device only."""
    hf_adapter: Any = None
    """Hook for Hugging Face export/import."""
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve_args(self, section: Any) -> Any:
        """Flavor args with every non-None field of the `[model]` section applied on top, validated."""
        if section.flavor not in self.flavors:
            from raven_titan.config.manager import _suggest

            raise RavenError(
                f"model.flavor = '{section.flavor}' is not a flavor of '{self.name}'"
                f"{_suggest(section.flavor, list(self.flavors))}; choose one of {sorted(self.flavors)}"
            )
        overrides = {
            f.name: getattr(section, f.name)
            for f in dataclasses.fields(self.args_cls)
            if getattr(section, f.name, None) is not None
        }
        args = dataclasses.replace(self.flavors[section.flavor], **overrides)
        args.validate()
        return args


_REGISTRY: dict[str, ModelSpec] = {}
_BUILTIN = {"raven": "raven_titan.models.raven"}


def register_model_spec(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise RavenError(f"model '{spec.name}' is registered twice; pick another name")
    _REGISTRY[spec.name] = spec


def get_model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        from raven_titan.config.manager import _suggest

        known = sorted(set(_REGISTRY) | set(_BUILTIN))
        raise RavenError(f"model.name = '{name}' is not registered{_suggest(name, known)}; known: {known}")
    return _REGISTRY[name]
