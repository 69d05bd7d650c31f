"""ELLISAdam: the Adam variant Huginn-0125 was trained with (reference spec §5.5).

Per parameter p with gradient g, moments m and v, and a per-tensor step counter t:

1. first step: m, v = g, g*g with ``running_init``, else zeros;
2. m <- lerp(m, g, 1 - beta1);  v <- beta2 * v + (1 - beta2) * g*g;
3. eta <- lr; with ``update_clipping``: v is clamped *in place* to >= eps^2,
   rms = sqrt(mean(g*g / v)), eta <- eta / max(rms, 1);
4. t <- t + 1; bc1 = 1 - beta1^t, bc2 = 1 - beta2^t; eta <- eta / bc1 (also with ``running_init``);
5. weight decay: ``decouple_wd`` => p <- p * (1 - (lr / initial_lr) * wd), i.e. wd times the schedule
   fraction, independent of the LR magnitude (``initial_lr`` is the group's peak LR recorded at
   construction); otherwise p <- p * (1 - lr * wd);
6. direction u = atan2(m, sqrt(v) / sqrt(bc2)) with ``atan_adam`` (bounded, no eps), else
   u = m / (sqrt(v) / sqrt(bc2) + eps);  p <- p - eta * u.

The moments are kept in fp32 (fp64 for fp64 parameters) whatever the parameter dtype. The step counter is a
float32 scalar tensor, as in ``torch.optim.Adam``, so ``state_dict`` / ``load_state_dict`` (inherited) and
``torch.distributed.checkpoint`` round-trip it exactly and a resumed run continues bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["ELLISAdam"]


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    """fp32 moments for low-precision parameters; fp32 / fp64 parameters keep their own dtype."""
    return param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32


class ELLISAdam(torch.optim.Optimizer):
    """Huginn's ELLISAdam (atan2 direction, update clipping, running init, decoupled weight decay).

    Every parameter group records its construction LR as ``initial_lr`` (the peak LR); an LR scheduler
    that scales ``lr`` per step (``LambdaLR``) then also scales the decoupled weight decay.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-6,
        weight_decay: float = 1e-2,
        update_clipping: bool = False,
        atan_adam: bool = False,
        running_init: bool = False,
        decouple_wd: bool = True,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"ELLISAdam: invalid learning rate {lr}")
        if not eps >= 0.0:
            raise ValueError(f"ELLISAdam: invalid eps {eps}")
        if not (0.0 <= betas[0] <= 1.0 and 0.0 <= betas[1] <= 1.0):
            raise ValueError(f"ELLISAdam: invalid betas {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"ELLISAdam: invalid weight_decay {weight_decay}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            update_clipping=update_clipping,
            atan_adam=atan_adam,
            running_init=running_init,
            decouple_wd=decouple_wd,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # The peak LR the decoupled weight decay is measured against. LambdaLR keeps an existing value.
        group.setdefault("initial_lr", group["lr"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # The base class casts floating-point state to the parameter dtype; low-precision parameters keep
        # fp32 moments, so take those again from the (fp32) saved values, without a round trip through bf16.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for param_id, p in zip(saved_ids, params):
            dtype = _state_dtype(p)
            if p.dtype == dtype or param_id not in state_dict["state"]:
                continue
            for key, value in state_dict["state"][param_id].items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(dtype=dtype, device=p.device, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("ELLISAdam does not support sparse gradients")
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        lr = group["lr"]
        dtype = _state_dtype(p)
        g = p.grad.to(dtype)
        # Work on the parameter itself when it is fp32/fp64, else on an fp32 copy written back at the end.
        w = p if p.dtype == dtype else p.detach().to(dtype)

        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if group["running_init"]:
                state["exp_avg"] = g.clone(memory_format=torch.preserve_format)
                state["exp_avg_sq"] = g * g
            else:
                state["exp_avg"] = torch.zeros_like(g, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(g, memory_format=torch.preserve_format)
        m, v = state["exp_avg"], state["exp_avg_sq"]

        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)

        eta: float | torch.Tensor = lr
        if group["update_clipping"]:
            v.clamp_(min=eps * eps)
            rms = (g * g / v).mean().sqrt()
            eta = lr / rms.clamp(min=1.0)  # a tensor: no host sync

        state["step"] += 1
        t = state["step"].item()
        bc1 = 1.0 - beta1**t
        bc2 = 1.0 - beta2**t
        eta = eta / bc1

        wd = group["weight_decay"]
        if wd != 0.0:
            if group["decouple_wd"]:
                initial_lr = group["initial_lr"]
                ratio = lr / initial_lr if initial_lr != 0 else 0.0
                w.mul_(1.0 - ratio * wd)
            else:
                w.mul_(1.0 - lr * wd)

        denom = v.sqrt().div_(math.sqrt(bc2))
        if group["atan_adam"]:
            u = torch.atan2(m, denom)
        else:
            u = m / denom.add_(eps)
        w.sub_(u.mul_(eta))
        if w is not p:
            p.copy_(w)
