"""Hugging Face interop: export to / import from the published Huginn-0125 folder layout.

- `export_hf(model, args, out_dir, tokenizer_dir, dtype, max_shard_bytes)`: write an HF folder (safetensors,
  config.json, generation_config.json, tokenizer, and the remote-code files `remote/configuration_raven.py` and
  `remote/modeling_raven.py` that transformers 5.x loads with `trust_remote_code=True`).
- `export_from_checkpoint(run_folder, step, out_dir, dtype, tokenizer_dir)`: the same from a DCP checkpoint;
  also `python -m raven_titan.hf.export --run RUN --out DIR`.
- `load_hf_weights(model, folder_or_repo)` / `args_from_hf_config(folder_or_repo)`: start a run from an HF
  folder or Hub repo (e.g. the released Huginn-0125 weights).

None of this imports transformers; only loading the exported folder with transformers needs it.
"""

import importlib

_LAZY = {
    "export_hf": "raven_titan.hf.export",
    "export_from_checkpoint": "raven_titan.hf.export",
    "load_hf_weights": "raven_titan.hf.load",
    "args_from_hf_config": "raven_titan.hf.load",
}


def __getattr__(name: str):
    # Lazy, so that `python -m raven_titan.hf.export` does not import its own module twice.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raven_titan.hf' has no attribute {name!r}")


__all__ = ["args_from_hf_config", "export_from_checkpoint", "export_hf", "load_hf_weights"]
