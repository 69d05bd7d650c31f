"""The Raven (Huginn) depth-recurrent language model, in one file.

    e   = P(wte[ids] * sqrt(E))                       prelude, run once: the injected input
    s_0 ~ TruncNormal(0, std, ±3 std) * sqrt(E) * init_scale
    s_i = R(adapter([s_{i-1}; e]))        i = 1..n+k  core, shared weights (n under no_grad, k with autograd)
    z   = ln_f(s_r);  logits = lm_head(ln_f(C(z)))    coda, the same ln_f both times, tied head

Module and parameter names follow the published Huginn-0125 layout (`raven_modeling_minimal.py`), so a
state dict moves between the two without renames. The model is single-device; activation checkpointing,
compile and parallelism are applied from outside (see `grad_iteration_wrapper`).

For generation, `embed`, `core_step` and `decode` take an optional `RecurrentKVCache` (`cache.py`, spec §1.11):
the new positions then start at `cache.length` (RoPE offset) and attend to the cached keys/values of every
earlier position at the same step index. Without a cache (training, validation) every call is as before.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raven_titan.errors import RavenError
from raven_titan.models.raven.args import RavenArgs
from raven_titan.models.raven.cache import RecurrentKVCache


class RMSNorm(nn.Module):
    """x / rms(x), computed in fp32 with autocast off, cast back to the input dtype, then times `weight`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


def precompute_freqs_cis(head_dim: int, end: int, theta: float, device=None) -> Tensor:
    """RoPE table (1, end, 1, head_dim/2, 2) of [cos, sin] of angle pos * theta^(-2i/head_dim), fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, S, H, D) by the angles in freqs_cis (1, S, 1, D/2, 2)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = freqs_cis.unbind(-1)
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return out.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, args: RavenArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv_width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim  # [Q | K | V], head-major
        self.Wqkv = nn.Linear(args.n_embd, qkv_width, bias=False)
        if args.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_heads, self.head_dim))
        else:
            self.qk_bias = None
        self.proj = nn.Linear(self.n_heads * self.head_dim, args.n_embd, bias=False)

    def forward(
        self, x: Tensor, freqs_cis: Tensor, cache: RecurrentKVCache | None = None, cache_key: int = 0
    ) -> Tensor:
        B, S, _ = x.shape
        h, h_kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.Wqkv(x).split([h * d, h_kv * d, h_kv * d], dim=-1)
        q, k, v = q.view(B, S, h, d), k.view(B, S, h_kv, d), v.view(B, S, h_kv, d)
        if h_kv != h:  # GQA: expand K/V to every query head (before the bias, as in the training code)
            k, v = k.repeat_interleave(h // h_kv, dim=2), v.repeat_interleave(h // h_kv, dim=2)
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the new positions see every cached one and, causally, each other
            k, v = cache.update(cache_key, k, v)
            kv_len = k.shape[2]
            mask = (
                None if S == 1 else torch.ones(S, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - S)
            )
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, h * d))


class GatedMLP(nn.Module):
    def __init__(self, args: RavenArgs):
        super().__init__()
        self.fc = nn.Linear(args.n_embd, 2 * args.intermediate_size, bias=False)  # [gate a | up b]
        self.proj = nn.Linear(args.intermediate_size, args.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(a) * b)


class SandwichBlock(nn.Module):
    def __init__(self, args: RavenArgs):
        super().__init__()
        self.norm_1 = RMSNorm(args.n_embd, args.norm_eps)
        self.attn = CausalSelfAttention(args)
        self.norm_2 = RMSNorm(args.n_embd, args.norm_eps)
        self.mlp = GatedMLP(args)
        self.norm_3 = RMSNorm(args.n_embd, args.norm_eps)
        self.norm_4 = RMSNorm(args.n_embd, args.norm_eps)

    def forward(
        self, x: Tensor, freqs_cis: Tensor, cache: RecurrentKVCache | None = None, cache_key: int = 0
    ) -> Tensor:
        x = self.norm_2(self.attn(self.norm_1(x), freqs_cis, cache, cache_key) + x)
        x = self.norm_4(self.mlp(self.norm_3(x)) + x)
        return x


@dataclass
class RavenOutput:
    logits: Tensor
    """(B, S, padded_vocab) in fp32."""
    latent: Tensor
    """ln_f(final core state), the coda's input. Still attached to the graph: detach it for telemetry."""
    num_steps_no_grad: int
    num_steps_with_grad: int


# A pytree node, so wrappers that walk module outputs (FSDP2's backward hooks) see the tensors inside.
torch.utils._pytree.register_dataclass(RavenOutput)

NumSteps = int | Sequence[int] | Tensor | None
GradIterationWrapper = Callable[..., Tensor]


class RavenForCausalLM(nn.Module):
    def __init__(self, args: RavenArgs):
        super().__init__()
        args.validate()
        self.args = args
        E, V = args.n_embd, args.padded_vocab_size
        modules = dict(
            wte=nn.Embedding(V, E),
            prelude=nn.ModuleList(SandwichBlock(args) for _ in range(args.n_layers_in_prelude)),
        )
        if args.injection_type == "linear":
            modules["adapter"] = nn.Linear(2 * E, E, bias=False)
        modules["core_block"] = nn.ModuleList(
            SandwichBlock(args) for _ in range(args.n_layers_in_recurrent_block)
        )
        modules["coda"] = nn.ModuleList(SandwichBlock(args) for _ in range(args.n_layers_in_coda))
        modules["ln_f"] = RMSNorm(E, args.norm_eps)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(E, V, bias=False)
        self.tie_weights()
        self.register_buffer(
            "freqs_cis", precompute_freqs_cis(args.head_dim, args.block_size, args.rope_base), persistent=True
        )
        self.grad_iteration_wrapper: GradIterationWrapper | None = None
        """If set, each gradient iteration runs as `wrapper(self.core_step, state, e)` (checkpointing)."""

    def tie_weights(self) -> None:
        if self.args.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    # ---- initialisation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Takase ("spike no more") init in place: truncated normal at ±3 std; norms 1, qk_bias 0.

        Works after `to_empty()` of a meta-device model: re-ties the head and recomputes `freqs_cis`.
        With `seed`, every parameter draws from its own generator seeded by (seed, parameter name), so the
        result does not depend on the global RNG (nor on which other parameters exist).
        """
        args = self.args
        self.tie_weights()
        self.freqs_cis.copy_(
            precompute_freqs_cis(args.head_dim, args.block_size, args.rope_base, device=self.freqs_cis.device)
        )
        std, out_std = args.init_std, args.out_proj_std
        for name, p in self.named_parameters():  # the tied head is listed once, as transformer.wte.weight
            name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")  # compile / AC
            if name.endswith("qk_bias"):
                p.zero_()
            elif ".norm_" in name or name.startswith("transformer.ln_f"):
                p.fill_(1.0)
            else:
                # attn.proj and mlp.proj get the depth-scaled std; everything else (wte, Wqkv, adapter,
                # untied lm_head, and mlp.fc) the base std. Both halves of mlp.fc (gate and up) get the base
                # std as in the Huginn training code (`Init.fn("glu")` passes w1's std for both); the
                # published HF `_init_weights` gives the up half the out-projection std instead.
                s = out_std if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else std
                gen = None
                if seed is not None:
                    gen = torch.Generator(device=p.device)
                    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
                nn.init.trunc_normal_(p, mean=0.0, std=s, a=-3 * s, b=3 * s, generator=gen)

    # ---- the pieces of the forward pass -------------------------------------------------------------------
    def _rope(self, seq_len: int, offset: int = 0) -> Tensor:
        """RoPE angles of positions offset .. offset + seq_len - 1."""
        if offset + seq_len > self.args.block_size:
            raise RavenError(
                f"sequence length {offset + seq_len} exceeds model.block_size = {self.args.block_size}; "
                "raise model.block_size or use shorter sequences"
            )
        return self.freqs_cis[:, offset : offset + seq_len]

    def embed(self, input_ids: Tensor, cache: RecurrentKVCache | None = None) -> Tensor:
        """e = prelude(wte[ids] * embed_scale): the input injected into every core iteration."""
        freqs_cis = self._rope(input_ids.shape[1], cache.length if cache is not None else 0)
        x = self.transformer.wte(input_ids) * self.args.embed_scale
        for i, block in enumerate(self.transformer.prelude):
            x = block(x, freqs_cis) if cache is None else block(x, freqs_cis, cache, i)
        return x

    def initialize_state(
        self, e: Tensor, init_scale: float, state_seeds: Sequence[int] | None = None
    ) -> Tensor:
        """s_0 ~ TruncNormal(0, std, ±3 std) * embed_scale * init_scale ("like-init"); 0 if init_scale == 0.

        With `state_seeds` (one per batch row), row i draws from a generator seeded with state_seeds[i], so a
        sample's noise does not depend on the rest of its batch (micro-batching, data-parallel split).
        """
        if init_scale == 0:
            return torch.zeros_like(e)
        std = self.args.init_std
        s = torch.empty(e.shape, dtype=torch.float32, device=e.device)
        if state_seeds is None or e.device.type == "meta":
            nn.init.trunc_normal_(s, mean=0.0, std=std, a=-3 * std, b=3 * std)
        else:
            if len(state_seeds) != e.shape[0]:
                raise ValueError(f"state_seeds has {len(state_seeds)} seeds for a batch of {e.shape[0]}")
            for row, seed in zip(s, state_seeds):
                gen = torch.Generator(device=e.device)
                gen.manual_seed(int(seed))
                nn.init.trunc_normal_(row, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=gen)
        return (s * (self.args.embed_scale * init_scale)).to(e.dtype)

    def core_step(
        self, state: Tensor, e: Tensor, cache: RecurrentKVCache | None = None, iteration: int = 0
    ) -> Tensor:
        """One recurrence: s <- core(adapter([s; e])) (state first), or core(s + e) for additive injection.
        `iteration` (0-based) only names the cache entries."""
        freqs_cis = self._rope(e.shape[1], cache.length if cache is not None else 0)
        if self.args.injection_type == "linear":
            x = self.transformer.adapter(torch.cat([state, e], dim=-1))
        else:
            x = state + e
        first = self.args.n_layers_in_prelude + iteration * self.args.n_layers_in_recurrent_block
        for j, block in enumerate(self.transformer.core_block):
            x = block(x, freqs_cis) if cache is None else block(x, freqs_cis, cache, first + j)
        return x

    def decode(self, latent: Tensor, cache: RecurrentKVCache | None = None) -> Tensor:
        """fp32 logits = lm_head(ln_f(coda(latent))), where latent = ln_f(state)."""
        freqs_cis = self._rope(latent.shape[1], cache.length if cache is not None else 0)
        x = latent
        for i, block in enumerate(self.transformer.coda):
            x = block(x, freqs_cis) if cache is None else block(x, freqs_cis, cache, -(i + 1))
        return self.lm_head(self.transformer.ln_f(x)).float()

    def predict(self, state: Tensor) -> Tensor:
        """fp32 logits from a core state: lm_head(ln_f(coda(ln_f(state))))."""
        return self.decode(self.transformer.ln_f(state))

    def num_steps_pair(self, num_steps: NumSteps) -> tuple[int, int]:
        """(n no-grad, k grad) iterations: None -> (mean_recurrence, 0); r -> (r, 0); (n, k) -> (n, k)."""
        if num_steps is None:
            return self.args.mean_recurrence, 0
        if isinstance(num_steps, Tensor):
            num_steps = num_steps.flatten().tolist()
        if isinstance(num_steps, int):
            num_steps = [num_steps]
        steps = [int(x) for x in num_steps]
        if len(steps) not in (1, 2) or min(steps) < 0:
            raise ValueError(f"num_steps must be None, r >= 0 or a pair (n, k) >= 0; got {num_steps}")
        return (steps[0], 0) if len(steps) == 1 else (steps[0], steps[1])

    def forward(
        self,
        input_ids: Tensor,
        num_steps: NumSteps = None,
        init_scale: float | None = None,
        state_seeds: Sequence[int] | None = None,
    ) -> RavenOutput:
        n, k = self.num_steps_pair(num_steps)
        e = self.embed(input_ids)
        state = self.initialize_state(
            e, self.args.init_scale if init_scale is None else init_scale, state_seeds
        )
        with torch.no_grad():  # truncated backprop: the first n iterations keep nothing for backward
            for _ in range(n):
                state = self.core_step(state, e)
        for _ in range(k):
            if self.grad_iteration_wrapper is None:
                state = self.core_step(state, e)
            else:
                state = self.grad_iteration_wrapper(self.core_step, state, e)
        latent = self.transformer.ln_f(state)
        return RavenOutput(self.decode(latent), latent, n, k)


__all__ = [
    "CausalSelfAttention",
    "GatedMLP",
    "RMSNorm",
    "RavenForCausalLM",
    "RavenOutput",
    "RecurrentKVCache",
    "SandwichBlock",
    "apply_rotary_emb",
    "precompute_freqs_cis",
]
