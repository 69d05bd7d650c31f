"""Shape and recurrence hyperparameters of the Raven (Huginn) depth-recurrent model.

Every field here can be overridden from the `[model]` section of a job TOML (or `--model.<field>` on the
command line) on top of a named flavor, so a new shape is a config edit. Names follow the published
Huginn-0125 `config.json` so that an export carries them unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from raven_titan.errors import RavenError

SamplingScheme = Literal["poisson-lognormal-filling", "poisson-fill", "fixed", "non-recurrent"]


@dataclass
class RavenArgs:
    n_embd: int = 256
    """Model width E (hidden size)."""
    n_heads: int = 4
    """Number of attention heads; must divide n_embd."""
    num_key_value_heads: int | None = None
    """Key/value heads for grouped-query attention (None: same as n_heads, as in Huginn-0125)."""
    intermediate_size: int = 512
    """Width I of the gated SiLU MLP (the fused gate/up projection has 2*I outputs)."""
    vocab_size: int = 4096
    """Tokenizer vocabulary size."""
    padding_multiple: int = 64
    """The embedding table is padded to a multiple of this (Huginn-0125: 4096, giving 65536)."""
    block_size: int = 1024
    """Length of the RoPE table: the longest sequence the model accepts."""
    n_layers_in_prelude: int = 1
    """Blocks in the prelude (run once)."""
    n_layers_in_recurrent_block: int = 2
    """Blocks in the recurrent core (looped r times with shared weights)."""
    n_layers_in_coda: int = 1
    """Blocks in the coda (run once)."""
    mean_recurrence: int = 4
    """Mean number r of core iterations during training (also the default depth at evaluation)."""
    mean_backprop_depth: int = 2
    """Iterations k that receive gradients (truncated backprop); the earlier ones run under no_grad."""
    sampling_scheme: SamplingScheme = "poisson-lognormal-filling"
    """How (n, k) is drawn each step: poisson-lognormal-filling (Huginn), poisson-fill, fixed, non-recurrent."""
    curriculum_steps: int = 0
    """Linearly ramp the mean depth and the backprop depth from 1 to their targets over this many steps (0: off)."""
    injection_type: Literal["linear", "add"] = "linear"
    """How the embedded input enters each core iteration: linear adapter on [state; e] (Huginn) or s + e."""
    init_scale: float = 1.0
    """Scale of the random initial latent state ("like-init"); 0 gives a zero state and deterministic outputs."""
    qk_bias: bool = True
    """Learned per-head bias added to queries and keys before RoPE."""
    rope_base: float = 50000.0
    """RoPE base theta."""
    norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = True
    """Share the input embedding and the output head."""
    init_strategy: Literal["takase"] = "takase"
    """Weight initialisation ("spike no more", Takase et al.: std sqrt(2/(5E)), depth-scaled out-projections)."""

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.padding_multiple) * self.padding_multiple

    @property
    def n_layers(self) -> int:
        """Physical blocks (prelude + core + coda)."""
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda

    @property
    def effective_expected_depth(self) -> int:
        """Blocks a token passes through at the mean recurrence (used by the init)."""
        return (
            self.n_layers_in_prelude
            + self.n_layers_in_coda
            + self.n_layers_in_recurrent_block * self.mean_recurrence
        )

    @property
    def init_std(self) -> float:
        return math.sqrt(2.0 / (5.0 * self.n_embd))

    @property
    def out_proj_std(self) -> float:
        return self.init_std / math.sqrt(2.0 * self.effective_expected_depth)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.n_embd)

    # ---- validation and counting --------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every inconsistency of the shape, as `model.<field>: what is wrong; how to fix` strings."""
        out = []
        positive = [f.name for f in fields(self) if f.type in ("int",) and f.name != "curriculum_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                out.append(f"model.{name} = {getattr(self, name)} must be >= 1")
        if self.curriculum_steps < 0:
            out.append("model.curriculum_steps must be >= 0")
        if self.n_heads >= 1 and self.n_embd % self.n_heads:
            out.append(
                f"model.n_heads = {self.n_heads} does not divide model.n_embd = {self.n_embd}; "
                "pick a head count that divides the width"
            )
        elif self.n_heads >= 1 and self.head_dim % 2:
            out.append(f"head_dim = n_embd / n_heads = {self.head_dim} must be even for RoPE pairs")
        if self.num_key_value_heads is not None and (
            self.num_key_value_heads < 1 or self.n_heads % self.num_key_value_heads
        ):
            out.append(
                f"model.num_key_value_heads = {self.num_key_value_heads} must divide model.n_heads = {self.n_heads}"
            )
        if self.mean_backprop_depth > self.mean_recurrence:
            out.append(
                f"model.mean_backprop_depth = {self.mean_backprop_depth} exceeds model.mean_recurrence = "
                f"{self.mean_recurrence}; backprop depth must be <= the recurrence"
            )
        if self.init_scale < 0:
            out.append("model.init_scale must be >= 0")
        if self.norm_eps <= 0 or self.rope_base <= 0:
            out.append("model.norm_eps and model.rope_base must be > 0")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise RavenError(problems[0])

    def num_params(self) -> dict[str, int]:
        """Unique parameter counts (tied head counted once): total, core, per block, static (non-core)."""
        E, I, d = self.n_embd, self.intermediate_size, self.head_dim
        block = (
            E * (E + 2 * self.n_kv_heads * d)  # Wqkv
            + E * E  # attn.proj
            + 2 * E * I  # mlp.fc (gate | up)
            + I * E  # mlp.proj
            + 4 * E  # four RMSNorm gains (sandwich)
            + (2 * self.n_heads * d if self.qk_bias else 0)
        )
        core = self.n_layers_in_recurrent_block * block
        adapter = 2 * E * E if self.injection_type == "linear" else 0
        embedding = self.padded_vocab_size * E
        head = 0 if self.tie_embeddings else embedding
        total = self.n_layers * block + adapter + embedding + head + E  # + ln_f
        return {
            "total": total,
            "core": core,
            "block": block,
            "static": total - core,
            "embedding": embedding,
        }
