"""Hugging Face import: weights (and shape) from a folder or Hub repo in the Huginn-0125 layout.

`load_hf_weights(model, folder_or_repo)` copies safetensors weights (single file or index-sharded) into our
model: keys map 1:1, `lm_head.weight` and `freqs_cis` may or may not be present (the released Huginn-0125
files carry both copies of the tied embedding; our exports store `transformer.wte.weight` only; `freqs_cis`
is always recomputed from the config), every shape is checked first, tensors are cast to the model's dtype
and the head is re-tied. `args_from_hf_config(folder_or_repo)` gives the matching RavenArgs.
A name that is not a local folder is a Hub repo id, fetched with huggingface_hub (safetensors and json only).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from raven_titan.errors import RavenError
from raven_titan.models.raven.args import RavenArgs

IGNORED_KEYS = ("freqs_cis",)
# Published config values this implementation reproduces; anything else is refused.
SUPPORTED = {
    "block_class_name": ("SandwichBlock",),
    "norm_class_name": ("RMSNorm_llama",),
    "mlp_class_name": ("GatedMLP",),
    "nonlin_name": ("SiLU",),
    "state_init": ("like-init",),
    "bias": (False,),
    "injection_type": ("linear", "add"),
}
SAMPLING_SCHEMES = ("poisson-lognormal-filling", "poisson-fill", "fixed", "non-recurrent")


def resolve_folder(
    folder_or_repo: str | Path, allow_patterns: tuple[str, ...] = ("*.safetensors", "*.json")
) -> Path:
    """A local folder as is; otherwise a Hub repo id downloaded (or taken from the local HF cache)."""
    path = Path(folder_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise RavenError(f"{path} is a file; give the folder that holds config.json and the safetensors")
    repo_id = str(folder_or_repo)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise RavenError(f"{repo_id} is neither a local folder nor a Hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(allow_patterns)))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RavenError(
            f"cannot fetch Hugging Face repo {repo_id!r} ({type(e).__name__}: {first}); it is not a local folder "
            "either. Check the name and the network (HF_HUB_OFFLINE), or download it and pass the folder"
        ) from None


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise RavenError(f"no config.json in {folder}; is it a Hugging Face model folder?") from None
    except json.JSONDecodeError as e:
        raise RavenError(f"{folder / 'config.json'} is not valid JSON: {e}") from None


def args_from_hf_config(folder_or_repo: str | Path) -> RavenArgs:
    """RavenArgs for the shape in an HF config.json (published Huginn fields or the transformers aliases)."""
    folder = resolve_folder(folder_or_repo, ("*.json",))
    cfg = _read_config(folder)
    if cfg.get("model_type", "huginn_raven") != "huginn_raven":
        raise RavenError(f"{folder}/config.json has model_type {cfg.get('model_type')!r}, not 'huginn_raven'")
    for key, allowed in SUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise RavenError(
                f"{folder}/config.json: {key} = {cfg[key]!r} is not supported (only {list(allowed)})"
            )

    def get(name: str, *aliases: str, default=None):
        for key in (name, *aliases):
            if cfg.get(key) is not None:
                return cfg[key]
        return default

    defaults = RavenArgs()
    n_heads = get("n_heads", "num_attention_heads")
    kv = get("num_key_value_heads")
    values = dict(
        n_embd=get("n_embd", "hidden_size"),
        n_heads=n_heads,
        num_key_value_heads=None if kv in (None, n_heads) else kv,
        intermediate_size=get("intermediate_size"),
        vocab_size=get("vocab_size"),
        padding_multiple=get("padding_multiple", default=defaults.padding_multiple),
        block_size=get("block_size", default=defaults.block_size),
        n_layers_in_prelude=get("n_layers_in_prelude"),
        n_layers_in_recurrent_block=get("n_layers_in_recurrent_block"),
        n_layers_in_coda=get("n_layers_in_coda"),
        mean_recurrence=get("mean_recurrence", default=defaults.mean_recurrence),
        mean_backprop_depth=get("mean_backprop_depth", default=defaults.mean_backprop_depth),
        injection_type=get("injection_type", default="linear"),
        init_scale=float(get("init_scale", default=1.0)),
        qk_bias=bool(get("qk_bias", default=True)),
        rope_base=float(get("rope_base", default=defaults.rope_base)),
        norm_eps=float(get("norm_eps", default=defaults.norm_eps)),
        tie_embeddings=bool(get("tie_embeddings", "tie_word_embeddings", default=True)),
    )
    missing = [k for k, v in values.items() if v is None and k != "num_key_value_heads"]
    if missing:
        raise RavenError(f"{folder}/config.json lacks {missing[0]}; is it a Huginn (huginn_raven) config?")
    scheme = get("sampling_scheme")
    if scheme in SAMPLING_SCHEMES:
        values["sampling_scheme"] = scheme
    args = dataclasses.replace(defaults, **values)
    padded = cfg.get("padded_vocab_size")
    if padded is not None and padded != args.padded_vocab_size:
        raise RavenError(
            f"{folder}/config.json: padded_vocab_size {padded} does not equal vocab_size {args.vocab_size} padded to "
            f"a multiple of {args.padding_multiple} ({args.padded_vocab_size})"
        )
    args.validate()
    return args


# ---- weights --------------------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise RavenError(f"{index} is not a safetensors index ({e})") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise RavenError(f"{absent[0]} is listed in {index.name} but missing; the download is incomplete")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise RavenError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def _clean(name: str) -> str:
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def _shape_hint(folder: Path, model_args: RavenArgs | None) -> str:
    """What to set so the model matches the checkpoint: a flavor when one fits, else the differing fields."""
    try:
        ckpt_args = args_from_hf_config(folder)
    except RavenError:
        return "build the model with the checkpoint's shape"
    from raven_titan.models.raven import FLAVORS

    shape_fields = [
        f.name
        for f in dataclasses.fields(RavenArgs)
        if f.name
        not in ("mean_recurrence", "mean_backprop_depth", "sampling_scheme", "curriculum_steps", "init_scale")
    ]
    for name, flavor in FLAVORS.items():
        if all(getattr(flavor, f) == getattr(ckpt_args, f) for f in shape_fields):
            return f"set model.flavor = '{name}'"
    if model_args is None:
        return "build the model with the shape in its config.json (args_from_hf_config)"
    diffs = [f for f in shape_fields if getattr(model_args, f) != getattr(ckpt_args, f)]
    return "set " + ", ".join(f"model.{f} = {getattr(ckpt_args, f)!r}" for f in diffs)


def load_hf_weights(model: nn.Module, folder_or_repo: str | Path) -> None:
    """Copy the HF checkpoint's weights into `model` (our RavenForCausalLM, materialized and not yet
    parallelized), in place. `freqs_cis` is not touched (the model's own table, from its config, is kept).

    Every key and shape is checked before anything is copied; RavenError names the first mismatch.
    """
    from safetensors import safe_open

    folder = resolve_folder(folder_or_repo)
    files = _weight_files(folder)
    params = {_clean(n): p for n, p in model.named_parameters(remove_duplicate=False)}
    for name, p in params.items():
        if p.is_meta:
            raise RavenError(
                f"{name} is on the meta device; materialize the model (to_empty) before loading weights"
            )
        if hasattr(p, "device_mesh"):
            raise RavenError(
                f"{name} is sharded (DTensor); load Hugging Face weights before parallelizing the model"
            )
    args: RavenArgs | None = getattr(model, "args", None)
    tied = (
        args.tie_embeddings
        if args is not None
        else params["lm_head.weight"] is params.get("transformer.wte.weight")
    )

    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                where[key] = f
                shapes[key] = tuple(sf.get_slice(key).get_shape())
    # Which file key feeds which parameter.
    sources = {k: k for k in where if k not in IGNORED_KEYS}
    if "lm_head.weight" in params:
        if tied:
            sources.pop("lm_head.weight", None)  # the head is the embedding
            if "transformer.wte.weight" not in sources and "lm_head.weight" in where:
                sources["transformer.wte.weight"] = "lm_head.weight"
        elif "lm_head.weight" not in sources and "transformer.wte.weight" in where:
            sources["lm_head.weight"] = "transformer.wte.weight"  # a tied checkpoint into an untied model
    targets = {n: p for n, p in params.items() if not (tied and n == "lm_head.weight")}
    for name, p in targets.items():  # shapes first: the most telling mismatch
        if name in sources and shapes[sources[name]] != tuple(p.shape):
            raise RavenError(
                f"{name}: shape {shapes[sources[name]]} in the checkpoint vs {tuple(p.shape)} in the model; "
                f"{_shape_hint(folder, args)}"
            )
    for name in targets:
        if name not in sources:
            raise RavenError(f"{folder}: the checkpoint has no {name}; {_shape_hint(folder, args)}")
    for key in sources:
        if key not in targets:
            raise RavenError(
                f"{folder}: {key} is in the checkpoint but not in the model; {_shape_hint(folder, args)}"
            )

    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for name, p in targets.items():
                    if where[sources[name]] == f:
                        p.copy_(sf.get_tensor(sources[name]))  # casts to the model's dtype and device
    if hasattr(model, "tie_weights"):
        model.tie_weights()


__all__ = ["args_from_hf_config", "load_hf_weights", "resolve_folder"]
