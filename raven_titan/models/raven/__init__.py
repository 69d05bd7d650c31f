"""The Raven (Huginn) depth-recurrent model family: flavors and registry entry."""

from __future__ import annotations

import dataclasses

from raven_titan.models import ModelSpec, register_model_spec
from raven_titan.models.raven.args import RavenArgs
from raven_titan.models.raven.flops import flops_per_token
from raven_titan.models.raven.model import RavenForCausalLM
from raven_titan.models.raven.sampler import expected_depth, sample_depth

# Huginn-0125 (spec §1.1, §3): exactly 3,564,976,800 parameters.
_NEBEL = RavenArgs(
    n_embd=5280,
    n_heads=55,
    intermediate_size=17920,
    vocab_size=65536,
    padding_multiple=4096,
    block_size=4096,
    n_layers_in_prelude=2,
    n_layers_in_recurrent_block=4,
    n_layers_in_coda=2,
    mean_recurrence=32,
    mean_backprop_depth=8,
    sampling_scheme="poisson-lognormal-filling",
)

FLAVORS: dict[str, RavenArgs] = {
    # Trains on a laptop CPU in minutes on the built-in Shakespeare corpus (4k-token tokenizer).
    "debug": RavenArgs(
        n_embd=256,
        n_heads=4,
        intermediate_size=704,
        vocab_size=4096,
        padding_multiple=64,
        block_size=1024,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
        mean_recurrence=4,
        mean_backprop_depth=2,
    ),
    # ~150M unique parameters (65k vocab): fits one GPU comfortably; unfolds to ~1.1B at r = 16.
    "raven-150m": RavenArgs(
        n_embd=1024,
        n_heads=16,
        intermediate_size=2816,
        vocab_size=65536,
        padding_multiple=4096,
        block_size=4096,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=4,
        n_layers_in_coda=1,
        mean_recurrence=16,
        mean_backprop_depth=4,
    ),
    "nebel-raven-3.5b": _NEBEL,
    # The non-recurrent baseline of the same shape (spec §7): one core pass, adapter kept.
    "nebel-raven-3.5b-baseline": dataclasses.replace(
        _NEBEL, mean_recurrence=1, mean_backprop_depth=1, sampling_scheme="non-recurrent"
    ),
}

register_model_spec(
    ModelSpec(
        name="raven",
        args_cls=RavenArgs,
        flavors=FLAVORS,
        build=RavenForCausalLM,
        num_params=RavenArgs.num_params,
        flops_per_token=flops_per_token,
        sample_depth=sample_depth,
        expected_depth=expected_depth,
    )
)
