"""Configuration of the Huginn-style depth-recurrent model (`model_type = "huginn_raven"`).

Standalone (imports only transformers): raven_titan copies this file into every Hugging Face export, next to
`modeling_raven.py`, and `config.json` names both through `auto_map`. Field names are those of the published
Huginn-0125 `config.json`; `attribute_map` gives the standard transformers names
(num_attention_heads -> n_heads, hidden_size -> n_embd, num_hidden_layers -> n_layers).
Defaults are the Huginn-0125 shape.
"""

import math

from transformers import PretrainedConfig


class RavenConfig(PretrainedConfig):
    model_type = "huginn_raven"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "num_attention_heads": "n_heads",
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layers",
    }

    def __init__(
        self,
        n_embd: int = 5280,
        n_heads: int = 55,
        num_key_value_heads: int | None = None,
        n_layers: int | None = None,
        block_size: int = 4096,
        vocab_size: int = 65536,
        padding_multiple: int = 4096,
        padded_vocab_size: int | None = None,
        intermediate_size: int = 17920,
        bias: bool = False,
        norm_eps: float = 1e-6,
        tie_embeddings: bool = True,
        injection_type: str = "linear",
        n_layers_in_prelude: int = 2,
        n_layers_in_recurrent_block: int = 4,
        n_layers_in_coda: int = 2,
        mean_recurrence: int = 32,
        mean_backprop_depth: int = 8,
        sampling_scheme: str = "poisson-lognormal-filling",
        qk_bias: bool = True,
        rope_base: float = 50000,
        init_strategy: str = "takase",
        init_orthogonal: bool = False,
        state_init: str = "like-init",
        init_scale: float = 1.0,
        test_time_noise: float = 0,
        test_time_noise_type: str = "fixed",
        activation_checkpoint_impl: str = "per-iteration",
        architecture_class_name: str = "RecurrentGPT",
        block_class_name: str = "SandwichBlock",
        norm_class_name: str = "RMSNorm_llama",
        mlp_class_name: str = "GatedMLP",
        nonlin_name: str = "SiLU",
        use_cache: bool = True,
        **kwargs,
    ):
        self.n_embd = n_embd
        self.n_heads = n_heads
        self.head_dim = n_embd // n_heads
        self.num_key_value_heads = num_key_value_heads or n_heads
        self.n_layers_in_prelude = n_layers_in_prelude
        self.n_layers_in_recurrent_block = n_layers_in_recurrent_block
        self.n_layers_in_coda = n_layers_in_coda
        self.n_layers = n_layers or (n_layers_in_prelude + n_layers_in_recurrent_block + n_layers_in_coda)
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.padding_multiple = padding_multiple
        self.padded_vocab_size = (
            padded_vocab_size or math.ceil(vocab_size / padding_multiple) * padding_multiple
        )
        self.intermediate_size = intermediate_size
        self.bias = bias
        self.norm_eps = norm_eps
        self.tie_embeddings = tie_embeddings
        self.tie_word_embeddings = tie_embeddings  # the name transformers' weight tying reads
        self.injection_type = injection_type
        self.mean_recurrence = mean_recurrence
        self.mean_backprop_depth = mean_backprop_depth
        self.sampling_scheme = sampling_scheme
        self.qk_bias = qk_bias
        self.rope_base = rope_base
        self.init_strategy = init_strategy
        self.init_orthogonal = init_orthogonal
        self.state_init = state_init
        self.init_scale = init_scale  # initial-state scale when forward() gets none (0: zero state)
        self.test_time_noise = test_time_noise
        self.test_time_noise_type = test_time_noise_type
        self.activation_checkpoint_impl = activation_checkpoint_impl
        self.architecture_class_name = architecture_class_name
        self.block_class_name = block_class_name
        self.norm_class_name = norm_class_name
        self.mlp_class_name = mlp_class_name
        self.nonlin_name = nonlin_name
        self.use_cache = use_cache
        # Derived values the published config carries (takase init).
        self.effective_expected_depth = (
            n_layers_in_prelude + n_layers_in_coda + n_layers_in_recurrent_block * mean_recurrence
        )
        std = math.sqrt(2 / (5 * n_embd))
        self.init_values = {
            "std": std,
            "out_proj": std / math.sqrt(2 * self.effective_expected_depth),
            "embedding": std,
            "embed_scale": math.sqrt(n_embd),
        }
        for derived in ("head_dim", "effective_expected_depth", "init_values", "tie_word_embeddings"):
            kwargs.pop(derived, None)  # recomputed above from the shape
        super().__init__(**kwargs)


__all__ = ["RavenConfig"]
