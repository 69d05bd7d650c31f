"""Huginn-style depth-recurrent language model for Hugging Face transformers 5.x (remote code).

Standalone (imports only torch and transformers): raven_titan copies this file into every export. Parameter
names, shapes and config fields are those of the published Huginn-0125 (`raven_modeling_minimal.py`), so the
released weights load here and exports from raven_titan load in the published code.

    e   = prelude(wte[ids] * sqrt(E))                      run once: the injected input
    s_0 ~ TruncNormal(0, std, +-3 std) * sqrt(E) * init_scale    (zero when init_scale == 0)
    s_i = core(adapter([s_{i-1}; e]))      i = 1..n+k      shared weights (n under no_grad, k with grad)
    logits = lm_head(ln_f(coda(ln_f(s_r))))                tied head, fp32 logits

Depth: `model(ids, num_steps=32)`, a pair `num_steps=(n, k)`, or `generate(..., num_steps=32)` (model kwargs
reach forward). Without num_steps an eval-mode model runs `config.mean_recurrence` iterations and a
training-mode model samples (n, k) as in Huginn's training. Generation caches keys/values per step index
(spec "full" strategy); keep num_steps fixed within one generate() call. The initial state is random
(`config.init_scale`, 1.0) unless `init_scale=0` is passed to forward() or generate().

Not implemented here (the published file has them): adaptive compute / early exit, speculative and
diffusion-style generation, cache sharing/compression strategies, static cache, test-time noise,
attention masks for padded batches (attention_mask is ignored), gradient checkpointing.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_raven import RavenConfig

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover
    hf_init = nn.init


class RMSNorm(nn.Module):
    """x / rms(x) in fp32 (autocast off), cast back to the input dtype, then times the gain."""

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
    """RoPE table (1, end, 1, head_dim/2, 2) of [cos, sin] of pos * theta^(-2i/head_dim), fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate the interleaved channel pairs (2i, 2i+1) of x (B, S, H, D)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = freqs_cis.float().unbind(-1)
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return out.type_as(x)


class HuginnDynamicCache:
    """Keys/values per step index: prelude layer i -> i, core layer j of iteration t -> P + R*t + j,
    coda layer i -> -(i+1). Each entry grows along the sequence ("full" lookup: a step index first reached in
    a later call only holds the tokens seen since). Implements what transformers' generate() asks of a cache."""

    is_compileable = False
    is_croppable = True

    def __init__(self) -> None:
        self.key_cache: dict[int, Tensor] = {}
        self.value_cache: dict[int, Tensor] = {}
        self._seen_tokens = 0

    def update(self, key: Tensor, value: Tensor, step_idx: int) -> tuple[Tensor, Tensor]:
        """Append (B, H, S, D) keys/values of `step_idx`; returns everything cached for it."""
        if step_idx == 0:  # the first prelude layer runs for every token exactly once
            self._seen_tokens += key.shape[-2]
        if step_idx in self.key_cache:
            key = torch.cat([self.key_cache[step_idx], key], dim=-2)
            value = torch.cat([self.value_cache[step_idx], value], dim=-2)
        self.key_cache[step_idx], self.value_cache[step_idx] = key, value
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen_tokens

    def __len__(self) -> int:
        return len(self.key_cache)

    def _apply(self, fn) -> None:
        self.key_cache = {s: fn(t) for s, t in self.key_cache.items()}
        self.value_cache = {s: fn(t) for s, t in self.value_cache.items()}

    def crop(self, tokens: int) -> None:
        """crop(-k) drops the last k tokens; crop(m >= 0) keeps the first m (0 is a no-op, as in transformers)."""
        if tokens == 0:
            return
        keep = self._seen_tokens + tokens if tokens < 0 else tokens
        keep = max(min(keep, self._seen_tokens), 0)
        drop = self._seen_tokens - keep
        self._apply(lambda t: t[..., : max(t.shape[-2] - drop, 0), :])
        self._seen_tokens = keep

    def reset(self) -> None:
        self.__init__()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def get_memory_usage(self) -> float:
        """Megabytes held by keys and values."""
        tensors = [*self.key_cache.values(), *self.value_cache.values()]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


class CausalSelfAttention(nn.Module):
    def __init__(self, config: RavenConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.Wqkv = nn.Linear(config.n_embd, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.qk_bias = (
            nn.Parameter(torch.zeros(2, 1, self.n_heads, self.head_dim)) if config.qk_bias else None
        )
        self.proj = nn.Linear(self.n_heads * self.head_dim, config.n_embd, bias=False)

    def forward(
        self, x: Tensor, freqs_cis: Tensor, step_idx: int, cache: HuginnDynamicCache | None
    ) -> Tensor:
        B, S, _ = x.shape
        h, h_kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.Wqkv(x).split([h * d, h_kv * d, h_kv * d], dim=-1)
        q, k, v = q.view(B, S, h, d), k.view(B, S, h_kv, d), v.view(B, S, h_kv, d)
        if h_kv != h:  # grouped-query attention: expand K/V before the bias, as in training
            k, v = k.repeat_interleave(h // h_kv, dim=2), v.repeat_interleave(h // h_kv, dim=2)
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, step_idx)
        q_len, kv_len = q.shape[2], k.shape[2]
        if q_len == kv_len:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif q_len == 1:  # one new token sees everything cached
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # a chunk after cached tokens: causal mask aligned to the bottom right
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, h * d))


class GatedMLP(nn.Module):
    def __init__(self, config: RavenConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)  # [gate | up]
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(a) * b)


class SandwichBlock(nn.Module):
    """x = n2(attn(n1(x)) + x); x = n4(mlp(n3(x)) + x)."""

    def __init__(self, config: RavenConfig):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config)
        self.norm_3 = RMSNorm(config.n_embd, config.norm_eps)
        self.norm_4 = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, step_idx: int, cache=None) -> Tensor:
        x = self.norm_2(self.attn(self.norm_1(x), freqs_cis, step_idx, cache) + x)
        return self.norm_4(self.mlp(self.norm_3(x)) + x)


@dataclass
class RavenCausalLMOutput(ModelOutput):
    """`cache` (transformers 5.x name) and `past_key_values` hold the same HuginnDynamicCache.
    `latent_states` = ln_f(final core state), the coda's input."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: Any = None
    past_key_values: Any = None
    latent_states: Tensor | None = None


class RavenPreTrainedModel(PreTrainedModel):
    config_class = RavenConfig
    base_model_prefix = "model"
    _no_split_modules = ["SandwichBlock"]
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _keys_to_ignore_on_load_missing = [r"freqs_cis"]  # recomputed by _init_weights when a file lacks it
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Takase init for fresh models (truncated at +-3 std); loaded weights are left alone."""
        std, out_std = self.config.init_values["std"], self.config.init_values["out_proj"]
        if isinstance(module, RavenForCausalLM):
            table = precompute_freqs_cis(self.config.head_dim, self.config.block_size, self.config.rope_base)
            hf_init.copy_(module.freqs_cis, table.to(module.freqs_cis.device))
        elif isinstance(module, RMSNorm):
            hf_init.ones_(module.weight)
        elif isinstance(module, CausalSelfAttention) and module.qk_bias is not None:
            hf_init.zeros_(module.qk_bias)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            s = out_std if getattr(module, "is_out_proj", False) else std
            hf_init.trunc_normal_(module.weight, mean=0.0, std=s, a=-3 * s, b=3 * s)


class RavenForCausalLM(RavenPreTrainedModel, GenerationMixin):
    def __init__(self, config: RavenConfig):
        super().__init__(config)
        if getattr(config, "test_time_noise", 0):
            raise ValueError("test_time_noise > 0 is not supported by this modeling file")
        E, V = config.n_embd, config.padded_vocab_size
        modules = dict(
            wte=nn.Embedding(V, E),
            prelude=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_prelude)),
        )
        if config.injection_type == "linear":
            modules["adapter"] = nn.Linear(2 * E, E, bias=False)
        elif config.injection_type != "add":
            raise ValueError(f"injection_type {config.injection_type!r} is not supported (linear or add)")
        modules["core_block"] = nn.ModuleList(
            SandwichBlock(config) for _ in range(config.n_layers_in_recurrent_block)
        )
        modules["coda"] = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_coda))
        modules["ln_f"] = RMSNorm(E, config.norm_eps)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(E, V, bias=False)
        for block in self.transformer.prelude + self.transformer.core_block + self.transformer.coda:
            block.attn.proj.is_out_proj = block.mlp.proj.is_out_proj = True
        freqs_cis = precompute_freqs_cis(config.head_dim, config.block_size, config.rope_base)
        self.register_buffer("freqs_cis", freqs_cis, persistent=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward() creates its own HuginnDynamicCache when use_cache is set

    # ---- depth ---------------------------------------------------------------------------------------------
    def num_steps_pair(self, num_steps) -> tuple[int, int]:
        """(n no-grad, k grad): None -> eval (mean_recurrence, 0) / training: sampled; r -> (r, 0); (n, k)."""
        if num_steps is None:
            return self.sample_depth() if self.training else (self.config.mean_recurrence, 0)
        if isinstance(num_steps, Tensor):
            num_steps = num_steps.flatten().tolist()
        steps = [int(num_steps)] if isinstance(num_steps, int | float) else [int(s) for s in num_steps]
        if len(steps) not in (1, 2) or min(steps) < 0:
            raise ValueError(f"num_steps must be None, an int >= 0 or a pair (n, k); got {num_steps}")
        return (steps[0], 0) if len(steps) == 1 else (steps[0], steps[1])

    def sample_depth(self) -> tuple[int, int]:
        """Training-time (n, k) draw of the config's sampling_scheme (global torch RNG)."""
        t = max(self.config.mean_recurrence - self.config.mean_backprop_depth, 0)
        s = self.config.mean_backprop_depth
        scheme = self.config.sampling_scheme
        if scheme == "fixed":
            return t, s
        if scheme == "non-recurrent":
            return 0, 1
        if scheme == "poisson-fill":
            return int(torch.poisson(torch.tensor(float(t)))), s
        sigma = 0.5  # poisson-lognormal-filling (Huginn)
        rate = torch.empty(()).log_normal_(math.log(t + s) - sigma**2 / 2, sigma)
        r = int(torch.poisson(rate)) + 1
        return max(r - s, 0), min(s, r)

    # ---- pieces ----------------------------------------------------------------------------------------------
    def initialize_state(self, e: Tensor, init_scale: float) -> Tensor:
        if init_scale == 0:
            return torch.zeros_like(e)
        std = self.config.init_values["std"]
        s = torch.empty(e.shape, dtype=torch.float32, device=e.device)
        nn.init.trunc_normal_(s, mean=0.0, std=std, a=-3 * std, b=3 * std)
        return (s * (self.config.init_values["embed_scale"] * init_scale)).to(e.dtype)

    def core_step(self, state: Tensor, e: Tensor, freqs_cis: Tensor, iteration: int, cache=None) -> Tensor:
        if self.config.injection_type == "linear":
            x = self.transformer.adapter(torch.cat([state, e], dim=-1))
        else:
            x = state + e
        first = self.config.n_layers_in_prelude + iteration * self.config.n_layers_in_recurrent_block
        for j, block in enumerate(self.transformer.core_block):
            x = block(x, freqs_cis, first + j, cache)
        return x

    def forward(
        self,
        input_ids: Tensor | None = None,
        num_steps=None,
        init_scale: float | None = None,
        labels: Tensor | None = None,
        cache: HuginnDynamicCache | None = None,
        past_key_values: HuginnDynamicCache | None = None,
        use_cache: bool | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        input_states: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> RavenCausalLMOutput:
        """Logits (fp32) after `num_steps` core iterations (see `num_steps_pair`).

        init_scale: scale of the random initial state (None: config.init_scale; 0: zero state, deterministic).
        input_states: a caller-supplied initial state instead (warm starts).
        labels: already shifted targets (B, S), -100 ignored, as in the published model.
        attention_mask: accepted for API compatibility and IGNORED (causal only; no padding masks), as in the
        published model. position_ids: one position vector shared by the batch (row 0 is used); default
        positions continue after the cached tokens.
        """
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, HuginnDynamicCache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    "RavenForCausalLM needs a HuginnDynamicCache; got a filled " + type(cache).__name__
                )
            cache = None  # an empty cache of another type (e.g. a user's DynamicCache) is replaced
            use_cache = True
        if use_cache and cache is None:
            cache = HuginnDynamicCache()
        if not use_cache and use_cache is not None:
            cache = None
        n, k = self.num_steps_pair(num_steps)

        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x = x * self.config.init_values["embed_scale"]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            positions = torch.arange(past, past + x.shape[1], device=x.device)
        else:
            positions = position_ids.reshape(-1, position_ids.shape[-1])[0]
        if int(positions.max()) >= self.config.block_size:
            raise ValueError(f"positions beyond block_size = {self.config.block_size} are not supported")
        freqs_cis = self.freqs_cis[:, positions]

        for i, block in enumerate(self.transformer.prelude):
            x = block(x, freqs_cis, i, cache)
        e = x
        scale = self.config.init_scale if init_scale is None else init_scale
        state = self.initialize_state(e, scale) if input_states is None else input_states
        with torch.no_grad():
            for t in range(n):
                state = self.core_step(state, e, freqs_cis, t, cache)
        for t in range(n, n + k):
            state = self.core_step(state, e, freqs_cis, t, cache)
        latent = self.transformer.ln_f(state)
        x = latent
        for i, block in enumerate(self.transformer.coda):
            x = block(x, freqs_cis, -(i + 1), cache)
        logits = self.lm_head(self.transformer.ln_f(x)).float()

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return RavenCausalLMOutput(
            loss=loss, logits=logits, cache=cache, past_key_values=cache, latent_states=latent
        )


RavenConfig.register_for_auto_class()
RavenForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["HuginnDynamicCache", "RavenConfig", "RavenForCausalLM", "RavenPreTrainedModel"]
