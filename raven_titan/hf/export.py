"""Hugging Face export: a folder in the published Huginn-0125 layout, loadable offline with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` on transformers 5.x.

Folder contents:
- `model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when the weights
  exceed `max_shard_bytes`. Keys are our parameter names, which are the published ones. The tied head is stored
  once, as `transformer.wte.weight` (the loaders re-tie `lm_head.weight`); `freqs_cis` (a persistent buffer in
  the published state dict) is stored in fp32 whatever the export dtype.
- `config.json`: every field of the published config (spec 1.10a) computed from RavenArgs, `model_type`
  huginn_raven, `auto_map` naming our own `configuration_raven.py` / `modeling_raven.py` (copied alongside),
  `num_hidden_layers` (transformers' generation reads it), `init_scale`, and bos/eos/pad ids from the tokenizer.
- `generation_config.json`, and the tokenizer files (with the Huginn chat template when the tokenizer has none).

Nothing here imports transformers: the trainer can export at the end of a run without it.
Command line: `python -m raven_titan.hf.export --run RUN_FOLDER [--step N] --out FOLDER [--dtype ...]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from raven_titan.errors import RavenError, run_command
from raven_titan.models.raven.args import RavenArgs

logger = logging.getLogger("raven_titan")

REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_raven.py", "modeling_raven.py")
AUTO_MAP = {
    "AutoConfig": "configuration_raven.RavenConfig",
    "AutoModelForCausalLM": "modeling_raven.RavenForCausalLM",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Spec 9.4: the published Huginn template (BOS first; assistant turns as "Huginn" inside a generation block).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] in ['assistant', 'Huginn'] %}"
    "<|begin_header|>Huginn<|end_header|>\n\n{% generation %}{{ message['content'] | trim }}<|end_turn|>"
    "{% endgeneration %}{% else %}<|begin_header|>{{ message['role'] }}<|end_header|>\n\n"
    "{{ message['content'] | trim }}<|end_turn|>{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|begin_header|>Huginn<|end_header|>\n\n{% else %}{{ eos_token }}{% endif %}"
)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
TRANSFORMERS_VERSION = "5.25.0"  # the version the remote files are written and tested for


# ---- config.json ----------------------------------------------------------------------------------------------
def hf_config_dict(args: RavenArgs, dtype: torch.dtype, special_ids: dict | None = None) -> dict:
    """config.json: the published Huginn fields (spec 1.10a) from `args`, plus what transformers needs."""
    cfg = {
        "activation_checkpoint_impl": "per-iteration",
        "architecture_class_name": "RecurrentGPT",
        "architectures": ["RavenForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "bias": False,
        "block_class_name": "SandwichBlock",
        "block_size": args.block_size,
        "effective_expected_depth": args.effective_expected_depth,
        "head_dim": args.head_dim,
        "init_orthogonal": False,
        "init_scale": args.init_scale,
        "init_strategy": args.init_strategy,
        "init_values": {
            "embed_scale": args.embed_scale,
            "embedding": args.init_std,
            "out_proj": args.out_proj_std,
            "std": args.init_std,
        },
        "injection_type": args.injection_type,
        "intermediate_size": args.intermediate_size,
        "mean_backprop_depth": args.mean_backprop_depth,
        "mean_recurrence": args.mean_recurrence,
        "mlp_class_name": "GatedMLP",
        "model_type": "huginn_raven",
        "n_embd": args.n_embd,
        "n_heads": args.n_heads,
        "n_layers": args.n_layers,
        "n_layers_in_coda": args.n_layers_in_coda,
        "n_layers_in_prelude": args.n_layers_in_prelude,
        "n_layers_in_recurrent_block": args.n_layers_in_recurrent_block,
        "nonlin_name": "SiLU",
        "norm_class_name": "RMSNorm_llama",
        "norm_eps": args.norm_eps,
        "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads,
        "padded_vocab_size": args.padded_vocab_size,
        "padding_multiple": args.padding_multiple,
        "qk_bias": args.qk_bias,
        "rope_base": args.rope_base,
        "sampling_scheme": args.sampling_scheme,
        "state_init": "like-init",
        "test_time_noise": 0,
        "test_time_noise_type": "fixed",
        "tie_embeddings": args.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if special_ids and special_ids.get(name) is not None:
            cfg[name] = special_ids[name]
    return cfg


# ---- tokenizer ----------------------------------------------------------------------------------------------
def _token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """Special-token ids: bos/eos/pad from tokenizer_config.json, looked up in tokenizer.json; end_turn too."""
    try:
        tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
        tcfg_path = tokenizer_dir / "tokenizer_config.json"
        tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise RavenError(f"cannot read the tokenizer in {tokenizer_dir}: {e}") from None
    vocab = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    for content, idx in (tok.get("model", {}).get("vocab") or {}).items():
        vocab.setdefault(content, idx)

    def lookup(token) -> int | None:
        if isinstance(token, dict):  # {"content": ...} form of AddedToken
            token = token.get("content")
        return vocab.get(token) if isinstance(token, str) else None

    ids = {
        name: lookup(tcfg.get(name.removesuffix("_id")))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    ids["end_turn_id"] = vocab.get("<|end_turn|>")
    ids["num_tokens"] = max(vocab.values(), default=-1) + 1
    return ids


def check_tokenizer(tokenizer_dir: Path, args: RavenArgs) -> dict[str, int]:
    """The tokenizer's special ids, after checking that its ids fit the model's embedding table."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise RavenError(f"no tokenizer.json in {tokenizer_dir}; pass the tokenizer folder (--tokenizer DIR)")
    ids = _token_ids(tokenizer_dir)
    if ids["num_tokens"] > args.padded_vocab_size:
        raise RavenError(
            f"the tokenizer in {tokenizer_dir} has {ids['num_tokens']} tokens but the model's vocabulary has "
            f"{args.padded_vocab_size} rows; export with the tokenizer the model was trained with"
        )
    return ids


def _copy_tokenizer(tokenizer_dir: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, dst / name)
    tcfg_path = dst / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    if not tcfg.get("chat_template") and not (dst / "chat_template.jinja").is_file():
        tcfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        tcfg["chat_template"] = CHAT_TEMPLATE
        tcfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")


def generation_config_dict(special_ids: dict | None) -> dict:
    gen: dict = {"_from_model_config": False, "transformers_version": TRANSFORMERS_VERSION, "use_cache": True}
    if special_ids:
        eos = [i for i in (special_ids.get("eos_token_id"), special_ids.get("end_turn_id")) if i is not None]
        for name, value in (
            ("bos_token_id", special_ids.get("bos_token_id")),
            ("eos_token_id", eos[0] if len(eos) == 1 else (eos or None)),
            ("pad_token_id", special_ids.get("pad_token_id")),
        ):
            if value is not None:
                gen[name] = value
    return gen


# ---- weights ----------------------------------------------------------------------------------------------
def _clean_name(name: str) -> str:
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def export_state_dict(model: nn.Module, args: RavenArgs) -> dict[str, torch.Tensor]:
    """The tensors to store, by published name (not yet gathered or cast); the tied head is left out."""
    out = {}
    for name, t in model.state_dict().items():
        name = _clean_name(name)
        if name == "lm_head.weight" and args.tie_embeddings:
            continue
        out[name] = t
    missing = {"transformer.wte.weight", "transformer.ln_f.weight"} - set(out)
    if missing:
        raise RavenError(f"the model has no {sorted(missing)[0]}; export_hf expects a raven model")
    return out


def _materialize(t: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Full (gathered if sharded) contiguous CPU copy in the export dtype (freqs_cis stays fp32)."""
    if hasattr(t, "full_tensor"):  # DTensor (FSDP2): a collective, every rank must take part
        t = t.full_tensor()
    t = t.detach()
    if t.is_floating_point():
        t = t.to(torch.float32 if name == "freqs_cis" else dtype)
    return t.to("cpu").contiguous().clone()


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _write_weights(
    tensors: dict[str, torch.Tensor], dst: Path, dtype: torch.dtype, max_shard_bytes: int, write: bool
) -> None:
    from safetensors.torch import save_file

    def nbytes(name: str, t: torch.Tensor) -> int:
        itemsize = (
            4 if name == "freqs_cis" else (dtype.itemsize if t.is_floating_point() else t.element_size())
        )
        return t.numel() * itemsize

    sizes = {name: nbytes(name, t) for name, t in tensors.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for names, fname in zip(shards, files):
        chunk = {name: _materialize(tensors[name], name, dtype) for name in names}  # one shard in memory
        if write:
            save_file(chunk, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        del chunk
    if write and len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- folder -------------------------------------------------------------------------------------------------
def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "huginn_raven"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def export_hf(
    model: nn.Module,
    args: RavenArgs,
    out_dir: Path,
    tokenizer_dir: Path | None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write the HF folder `out_dir` (atomically: a temporary folder renamed at the end) and return it.

    With a sharded model (DTensor parameters) call it on every rank: tensors are gathered shard by shard and
    rank 0 writes. An existing `out_dir` is replaced only if it is an earlier export.
    """
    out_dir = Path(out_dir)
    if dtype not in DTYPES.values():
        raise RavenError(f"export dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
    if max_shard_bytes < 1:
        raise RavenError("max_shard_bytes must be >= 1")
    rank = dist.get_rank() if dist.is_initialized() else 0
    write = rank == 0
    if out_dir.exists() and not (out_dir.is_dir() and (_is_export(out_dir) or not any(out_dir.iterdir()))):
        raise RavenError(
            f"{out_dir} exists and is not an earlier Hugging Face export; choose another output folder"
        )
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tensors = export_state_dict(model, args)
    special = check_tokenizer(Path(tokenizer_dir), args) if tokenizer_dir is not None else None
    try:
        if write:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _write_weights(tensors, tmp, dtype, max_shard_bytes, write)
        if write:
            if tokenizer_dir is not None:
                _copy_tokenizer(Path(tokenizer_dir), tmp)
            _write_json(tmp / "config.json", hf_config_dict(args, dtype, special))
            _write_json(tmp / "generation_config.json", generation_config_dict(special))
            for name in REMOTE_FILES:
                shutil.copy2(REMOTE_DIR / name, tmp / name)
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            if out_dir.exists():
                out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if write:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_initialized():
        dist.barrier()
    if write:
        logger.info("Hugging Face export written: %s", out_dir)
    return out_dir


# ---- from a DCP checkpoint ----------------------------------------------------------------------------------
def args_from_run(run_folder: Path) -> tuple[RavenArgs, dict]:
    """RavenArgs from the "model" section of the run's config.json (and the whole config)."""
    path = Path(run_folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise RavenError(
            f"{path} not found; --run must be a run folder (job.dump_folder) of a training run"
        ) from None
    except json.JSONDecodeError as e:
        raise RavenError(f"{path} is not valid JSON: {e}") from None
    section = cfg.get("model")
    if not isinstance(section, dict):
        raise RavenError(f'{path} has no "model" section; is this a raven_titan run folder?')
    if section.get("name", "raven") != "raven":
        raise RavenError(
            f"model.name = {section['name']!r} in {path}; only 'raven' models export to Hugging Face"
        )
    names = {f.name for f in dataclasses.fields(RavenArgs)}
    args = RavenArgs(**{k: v for k, v in section.items() if k in names and v is not None})
    args.validate()
    return args, cfg


def _complete_steps(folder: Path) -> list[int]:
    steps = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith("step-") and p.name[5:].isdigit() and (p / ".metadata").is_file():
                steps.append(int(p.name[5:]))
    return sorted(steps)


@contextlib.contextmanager
def _quiet_dcp():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_checkpoint_model(
    run_folder: Path, step: int | None = None
) -> tuple[nn.Module, RavenArgs, int, dict]:
    """A plain (unsharded, CPU, fp32) model holding the model state of checkpoint `step` (None: latest)."""
    import torch.distributed.checkpoint as dcp

    from raven_titan.models.raven.model import RavenForCausalLM, precompute_freqs_cis

    args, cfg = args_from_run(run_folder)
    ckpt_root = Path(run_folder) / (cfg.get("checkpoint") or {}).get("folder", "checkpoint")
    steps = _complete_steps(ckpt_root)
    if step is None:
        if not steps:
            raise RavenError(f"no complete checkpoint (step-N with .metadata) in {ckpt_root}")
        step = steps[-1]
    path = ckpt_root / f"step-{step}"
    if step not in steps:
        raise RavenError(f"checkpoint {path} does not exist or is incomplete; available steps: {steps}")
    with torch.device("meta"):
        model = RavenForCausalLM(args)
    model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        model.freqs_cis.copy_(precompute_freqs_cis(args.head_dim, args.block_size, args.rope_base))
    with _quiet_dcp():
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved_model = {_clean_name(k.removeprefix("model.")): k for k in saved if k.startswith("model.")}
    targets = {}
    for name, p in model.named_parameters():  # the tied head is listed once, as transformer.wte.weight
        if name not in saved_model:
            raise RavenError(
                f"checkpoint {path} has no model state for {name}; was it saved by a raven model?"
            )
        if tuple(saved[saved_model[name]].size) != tuple(p.shape):
            raise RavenError(
                f"{name}: shape {tuple(saved[saved_model[name]].size)} in {path} vs {tuple(p.shape)} from "
                f"{Path(run_folder) / 'config.json'}; the run config does not match its checkpoint"
            )
        targets[saved_model[name]] = p.data
    try:
        with _quiet_dcp():
            dcp.load(targets, checkpoint_id=str(path), no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP raises many types; the first line is what matters
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RavenError(f"could not load the model state from {path}: {first}") from None
    model.tie_weights()
    return model, args, step, cfg


def export_from_checkpoint(
    run_folder: Path,
    step: int | None,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_dir: Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Export checkpoint `step` (None: the latest complete one) of a run folder. The tokenizer defaults to the
    run's data.tokenizer when that folder exists."""
    model, args, step, cfg = load_checkpoint_model(Path(run_folder), step)
    if tokenizer_dir is None:
        configured = (cfg.get("data") or {}).get("tokenizer")
        if configured:
            from raven_titan.config.manager import repo_path

            candidate = repo_path(configured)
            if (candidate / "tokenizer.json").is_file():
                tokenizer_dir = candidate
            else:
                logger.warning("tokenizer %s not found; exporting without tokenizer files", candidate)
    logger.info("exporting %s step %d", run_folder, step)
    return export_hf(model, args, Path(out_dir), tokenizer_dir, dtype, max_shard_bytes)


# ---- command line ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raven_titan.hf.export",
        description="Export a raven_titan checkpoint as a Hugging Face folder (Huginn-0125 layout, remote code).",
    )
    parser.add_argument(
        "--run", required=True, type=Path, help="run folder (job.dump_folder) with config.json"
    )
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the latest complete)"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (replaced if an earlier export)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bfloat16", help="weight dtype (default bfloat16)"
    )
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the run's)")
    parser.add_argument(
        "--max-shard-gib",
        type=float,
        default=5.0,
        help="largest safetensors file before sharding (default 5)",
    )
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def body() -> None:
        shard = max(int(ns.max_shard_gib * 2**30), 1)
        print(export_from_checkpoint(ns.run, ns.step, ns.out, DTYPES[ns.dtype], ns.tokenizer, shard))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
