"""Hugging Face export/import: logits round trip through transformers (trust_remote_code, offline), the KV
cache across recurrences and generate(), importing exports and published-style folders, sharding, DCP
checkpoints, config.json fields."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

# Before transformers / huggingface_hub are imported: no network, remote-code modules outside the home folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_MODULES_CACHE", str(Path(tempfile.gettempdir()) / "raven_titan_test_hf_modules"))

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raven_titan.errors import RavenError
from raven_titan.hf import args_from_hf_config, export_from_checkpoint, export_hf, load_hf_weights
from raven_titan.hf.export import hf_config_dict
from raven_titan.hf.export import main as export_main
from raven_titan.models.raven.args import RavenArgs
from raven_titan.models.raven.model import RavenForCausalLM

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tokenizer" / "shakespeare_4k"
TINY = RavenArgs(
    n_embd=64,
    n_heads=2,
    intermediate_size=128,
    vocab_size=4096,  # the test tokenizer's size (ids 0..4095)
    padding_multiple=64,
    block_size=64,
    n_layers_in_prelude=1,
    n_layers_in_recurrent_block=2,
    n_layers_in_coda=1,
    mean_recurrence=4,
    mean_backprop_depth=2,
)
# spec 1.10a: config.json written by the published code for E=128, 4 heads, 1/2/1, vocab 1024, block 64, r 4, k 2.
PUBLISHED_EXAMPLE = {
    "activation_checkpoint_impl": "per-iteration",
    "architecture_class_name": "RecurrentGPT",
    "architectures": ["RavenForCausalLM"],
    "bias": False,
    "block_class_name": "SandwichBlock",
    "block_size": 64,
    "effective_expected_depth": 10,
    "head_dim": 32,
    "init_orthogonal": False,
    "init_strategy": "takase",
    "init_values": {
        "embed_scale": 11.313708498984761,
        "embedding": 0.05590169943749474,
        "out_proj": 0.012499999999999999,
        "std": 0.05590169943749474,
    },
    "injection_type": "linear",
    "intermediate_size": 256,
    "mean_backprop_depth": 2,
    "mean_recurrence": 4,
    "mlp_class_name": "GatedMLP",
    "model_type": "huginn_raven",
    "n_embd": 128,
    "n_heads": 4,
    "n_layers": 4,
    "n_layers_in_coda": 1,
    "n_layers_in_prelude": 1,
    "n_layers_in_recurrent_block": 2,
    "nonlin_name": "SiLU",
    "norm_class_name": "RMSNorm_llama",
    "norm_eps": 1e-06,
    "num_key_value_heads": 4,
    "padded_vocab_size": 1024,
    "padding_multiple": 64,
    "qk_bias": True,
    "rope_base": 50000,
    "sampling_scheme": "poisson-lognormal-filling",
    "state_init": "like-init",
    "test_time_noise": 0,
    "test_time_noise_type": "fixed",
    "tie_embeddings": True,
    "torch_dtype": "float32",
    "transformers_version": "4.51.3",
    "vocab_size": 1024,
}


def make_model(args: RavenArgs = TINY, seed: int = 0) -> RavenForCausalLM:
    model = RavenForCausalLM(args)
    model.init_weights(seed=seed)
    return model.eval()


def ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def native_logits(model, x, num_steps=4) -> torch.Tensor:
    return model(x, num_steps=num_steps, init_scale=0).logits


@pytest.fixture(scope="module")
def native():
    return make_model()


@pytest.fixture(scope="module")
def export_dir(native, tmp_path_factory) -> Path:
    return export_hf(native, TINY, tmp_path_factory.mktemp("hf") / "export", TOKENIZER, dtype=torch.float32)


def hf_load(folder: Path, **kw):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kw).eval()


@pytest.fixture(scope="module")
def hf_model(export_dir):
    return hf_load(export_dir)


# ---- export layout ----------------------------------------------------------------------------------------------
def test_config_json_has_published_fields_and_generation_needs(export_dir):
    cfg = json.loads((export_dir / "config.json").read_text())
    for key in PUBLISHED_EXAMPLE:
        assert key in cfg, key
    assert cfg["model_type"] == "huginn_raven"
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_raven.RavenConfig",
        "AutoModelForCausalLM": "modeling_raven.RavenForCausalLM",
    }
    assert cfg["num_hidden_layers"] == cfg["n_layers"] == 4
    assert cfg["effective_expected_depth"] == 1 + 1 + 2 * 4
    assert cfg["padded_vocab_size"] == 4096 and cfg["torch_dtype"] == "float32"
    assert cfg["init_values"]["std"] == TINY.init_std and cfg["init_values"]["out_proj"] == TINY.out_proj_std
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (4064, 4065, 4069)
    gen = json.loads((export_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [4065, 4068] and gen["bos_token_id"] == 4064  # <|end_text|>, <|end_turn|>
    names = {p.name for p in export_dir.iterdir()}
    assert {"model.safetensors", "configuration_raven.py", "modeling_raven.py", "tokenizer.json"} <= names
    assert (
        "{% generation %}" in json.loads((export_dir / "tokenizer_config.json").read_text())["chat_template"]
    )
    with safe_open(str(export_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "freqs_cis" in keys and "lm_head.weight" not in keys
    assert keys == {k for k in native_state_keys()} - {"lm_head.weight"}


def native_state_keys():
    return make_model().state_dict().keys()


def test_config_matches_the_published_example():
    args = RavenArgs(
        n_embd=128,
        n_heads=4,
        intermediate_size=256,
        vocab_size=1024,
        padding_multiple=64,
        block_size=64,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
        mean_recurrence=4,
        mean_backprop_depth=2,
    )
    cfg = hf_config_dict(args, torch.float32)
    for key, value in PUBLISHED_EXAMPLE.items():
        if key != "transformers_version":
            assert cfg[key] == value, key
    # ... and the published config.json reads back as the same shape
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(PUBLISHED_EXAMPLE))
    assert args_from_hf_config(folder) == args
    shutil.rmtree(folder)


def test_huginn_0125_config_gives_the_nebel_flavor(tmp_path):
    from raven_titan.hf.load import _shape_hint
    from raven_titan.models.raven import FLAVORS

    nebel = FLAVORS["nebel-raven-3.5b"]
    cfg = {k: v for k, v in hf_config_dict(nebel, torch.bfloat16).items() if k != "n_heads"}
    cfg["num_attention_heads"] = 55  # the released config.json spells it so
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert args_from_hf_config(tmp_path) == nebel
    assert _shape_hint(tmp_path, FLAVORS["debug"]) == "set model.flavor = 'nebel-raven-3.5b'"
    cfg["norm_class_name"] = "LayerNorm"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RavenError, match="norm_class_name = 'LayerNorm' is not supported"):
        args_from_hf_config(tmp_path)


def test_bf16_export_and_existing_folders(native, tmp_path):
    out = export_hf(native, TINY, tmp_path / "bf16", None, dtype=torch.bfloat16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.wte.weight").dtype == torch.bfloat16
        assert f.get_tensor("freqs_cis").dtype == torch.float32  # the RoPE table keeps full precision
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    export_hf(native, TINY, out, None, dtype=torch.float32)  # an earlier export is replaced
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(RavenError, match="not an earlier Hugging Face export"):
        export_hf(native, TINY, other, None)
    small = dataclasses.replace(TINY, vocab_size=256)
    with pytest.raises(RavenError, match="has 4096 tokens"):
        export_hf(make_model(small), small, tmp_path / "small", TOKENIZER)


# ---- transformers round trip ----------------------------------------------------------------------------------
def test_round_trip_logits_under_transformers(native, hf_model):
    x = ids()
    assert hf_model.dtype == torch.float32
    assert hf_model.lm_head.weight is hf_model.transformer.wte.weight
    with torch.no_grad():
        for steps in (4, (3, 1), 2, [0, 2]):
            ref = native_logits(native, x, steps)
            got = hf_model(x, num_steps=steps, init_scale=0).logits
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert (got - ref).abs().max().item() <= 1e-5, steps
        assert not torch.allclose(native_logits(native, x, 4), native_logits(native, x, 2))  # depth matters
        default = hf_model(x, init_scale=0).logits  # eval default: config.mean_recurrence
        assert (default - native_logits(native, x, 4)).abs().max().item() <= 1e-5
        noisy = hf_model(x, num_steps=4).logits  # config.init_scale = 1: a random initial state
        assert not torch.allclose(noisy, default)


@torch.no_grad()
def test_kv_cache_across_recurrences_matches_full_forward(hf_model):
    transformers = pytest.importorskip("transformers")
    modeling = __import__(type(hf_model).__module__, fromlist=["HuginnDynamicCache"])
    x = ids(batch=2, length=14, seed=3)
    full = hf_model(x, num_steps=3, init_scale=0).logits
    out = hf_model(x[:, :10], num_steps=3, init_scale=0, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, modeling.HuginnDynamicCache) and out.cache is cache
    assert cache.get_seq_length() == 10 and len(cache) == 1 + 2 * 3 + 1  # prelude, 2 core x 3 steps, coda
    assert set(cache.key_cache) == set(range(0, 7)) | {-1}
    step = hf_model(x[:, 10:11], num_steps=3, init_scale=0, cache=cache)  # one token
    chunk = hf_model(x[:, 11:14], num_steps=3, init_scale=0, past_key_values=cache)  # a chunk after the cache
    assert cache.get_seq_length() == 14
    for got, sl in ((out.logits, slice(0, 10)), (step.logits, slice(10, 11)), (chunk.logits, slice(11, 14))):
        assert (got - full[:, sl]).abs().max().item() <= 1e-5
    cache.crop(-4)
    assert cache.get_seq_length() == 10 and cache.key_cache[0].shape[-2] == 10
    assert transformers is not None


def test_generate_with_and_without_cache(hf_model):
    prompt = ids(batch=2, length=6, seed=5)
    kw = dict(max_new_tokens=8, do_sample=False, num_steps=4, init_scale=0)
    with torch.no_grad():
        cached = hf_model.generate(prompt, use_cache=True, **kw)
        plain = hf_model.generate(prompt, use_cache=False, **kw)
        native_greedy = prompt
        for _ in range(8):  # the same greedy decode with the full forward of the exported model
            nxt = hf_model(native_greedy, num_steps=4, init_scale=0).logits[:, -1].argmax(-1, keepdim=True)
            native_greedy = torch.cat([native_greedy, nxt], dim=1)
    assert cached.shape == (2, 6 + 8)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, native_greedy)


# ---- import -----------------------------------------------------------------------------------------------------
def test_import_reproduces_the_exported_logits(native, export_dir, tmp_path):
    x = ids()
    fresh = make_model(seed=1)
    assert not torch.allclose(native_logits(fresh, x), native_logits(native, x))
    load_hf_weights(fresh, str(export_dir))
    assert torch.equal(native_logits(fresh, x), native_logits(native, x))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight

    # The released Huginn-0125 files carry both copies of the tied embedding; freqs_cis may be absent.
    published = tmp_path / "published"
    shutil.copytree(export_dir, published)
    sd = load_file(published / "model.safetensors")
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    del sd["freqs_cis"]
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(published / "model.safetensors"))
    bf16 = make_model(seed=2).to(torch.bfloat16)
    load_hf_weights(bf16, published)
    assert bf16.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.transformer.adapter.weight, native.transformer.adapter.weight.to(torch.bfloat16))
    assert bf16.lm_head.weight is bf16.transformer.wte.weight
    hf = hf_load(published, dtype=torch.float32)  # transformers ties and recomputes freqs_cis too
    assert torch.equal(hf.freqs_cis, native.freqs_cis)
    fp32 = make_model(seed=3)
    load_hf_weights(fp32, published)  # bf16 file into an fp32 model
    with torch.no_grad():
        assert (hf(x, num_steps=4, init_scale=0).logits - native_logits(fp32, x)).abs().max() <= 1e-5


def test_import_mismatches_name_the_key(export_dir, tmp_path):
    narrow = make_model(dataclasses.replace(TINY, n_embd=32, intermediate_size=64))
    with pytest.raises(RavenError) as err:
        load_hf_weights(narrow, export_dir)
    msg = str(err.value)
    assert msg.startswith(
        "transformer.wte.weight: shape (4096, 64) in the checkpoint vs (4096, 32) in the model"
    )
    assert "model.n_embd = 64" in msg and "model.intermediate_size = 128" in msg
    deeper = make_model(dataclasses.replace(TINY, n_layers_in_prelude=2))
    with pytest.raises(
        RavenError,
        match=r"has no transformer\.prelude\.1\.norm_1\.weight; set model\.n_layers_in_prelude = 1",
    ):
        load_hf_weights(deeper, export_dir)
    with torch.device("meta"):
        meta = RavenForCausalLM(TINY)
    with pytest.raises(RavenError, match="meta device; materialize the model"):
        load_hf_weights(meta, export_dir)
    # A checkpoint whose shape is a named flavor: the hint names the flavor.
    from raven_titan.models.raven import FLAVORS

    debug = tmp_path / "debug"
    debug.mkdir()
    (debug / "config.json").write_text(json.dumps(hf_config_dict(FLAVORS["debug"], torch.bfloat16)))
    save_file({"transformer.wte.weight": torch.zeros(4096, 256)}, str(debug / "model.safetensors"))
    with pytest.raises(
        RavenError, match=r"\(4096, 256\) in the checkpoint vs \(4096, 64\).*model.flavor = 'debug'"
    ):
        load_hf_weights(make_model(), debug)


def test_hub_repo_offline_is_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RavenError, match="cannot fetch Hugging Face repo 'nobody/no-such-raven'"):
        load_hf_weights(make_model(), "nobody/no-such-raven")
    with pytest.raises(RavenError, match="neither a local folder nor a Hub repo"):
        args_from_hf_config(str(tmp_path / "missing" / "folder"))


# ---- sharding ---------------------------------------------------------------------------------------------------
def test_sharded_export_has_an_index_and_reloads(native, tmp_path):
    out = export_hf(native, TINY, tmp_path / "sharded", None, dtype=torch.float32, max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(native_state_keys()) - {"lm_head.weight"}
    sizes = sum((out / f).stat().st_size for f in files)
    assert index["metadata"]["total_size"] <= sizes
    x = ids()
    fresh = make_model(seed=4)
    load_hf_weights(fresh, out)
    assert torch.equal(native_logits(fresh, x), native_logits(native, x))
    hf = hf_load(out)
    with torch.no_grad():
        assert (hf(x, num_steps=4, init_scale=0).logits - native_logits(native, x)).abs().max() <= 1e-5


# ---- from a DCP checkpoint --------------------------------------------------------------------------------------
def test_export_from_checkpoint_and_cli(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    model = make_model(seed=7)
    run = tmp_path / "run"
    step_dir = run / "checkpoint" / "step-3"
    step_dir.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(step_dir), no_dist=True)
    section = {"name": "raven", "flavor": "debug", **dataclasses.asdict(TINY)}
    run_cfg = {
        "model": section,
        "checkpoint": {"folder": "checkpoint"},
        "data": {"tokenizer": str(TOKENIZER)},
    }
    (run / "config.json").write_text(json.dumps(run_cfg))

    out = export_from_checkpoint(run, None, tmp_path / "out", torch.float32)
    assert (out / "tokenizer.json").is_file()  # the run's tokenizer
    fresh = make_model(seed=8)
    load_hf_weights(fresh, out)
    x = ids()
    assert torch.equal(native_logits(fresh, x), native_logits(model, x))
    assert args_from_hf_config(out) == TINY

    assert (
        export_main(["--run", str(run), "--step", "3", "--out", str(tmp_path / "cli"), "--dtype", "float32"])
        == 0
    )
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert export_main(["--run", str(run), "--step", "5", "--out", str(tmp_path / "cli2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "available steps: [3]" in err and len(err.splitlines()) == 1
    assert export_main(["--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "cli3")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as help_exit:
        export_main(["--help"])
    assert help_exit.value.code == 0 and "--run" in capsys.readouterr().out
