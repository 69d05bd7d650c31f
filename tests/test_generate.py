"""Generation: seeded determinism, the KV cache across recurrences, adaptive exit, sampling filters, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from raven_titan.data.tokenizer import load_tokenizer
from raven_titan.errors import RavenError
from raven_titan.eval.generate import (
    ExitCriterion,
    chat_prompt_ids,
    encode_text,
    filter_logits,
    generate,
    generate_batch,
    main,
)
from raven_titan.models.raven.args import RavenArgs
from raven_titan.models.raven.cache import RecurrentKVCache
from raven_titan.models.raven.model import RavenForCausalLM

CRITERIA = ["kl", "entropy-diff", "latent-diff", "argmax-stability"]


def tiny_model(seed: int = 0, **overrides) -> RavenForCausalLM:
    kw = dict(
        n_embd=32, n_heads=4, intermediate_size=48, vocab_size=100, padding_multiple=64, block_size=64,
        n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1, mean_recurrence=4,
        mean_backprop_depth=2,
    )  # fmt: skip
    kw.update(overrides)
    model = RavenForCausalLM(RavenArgs(**kw))
    model.init_weights(seed)
    with torch.no_grad():  # sharper distributions than at init, so sampled tokens depend on the computation
        model.transformer.wte.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two that wait for each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


PROMPT = [3, 17, 42, 8, 99, 5]


def test_seeded_generation_is_deterministic(model):
    kw = dict(num_steps=2, max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01)
    a = generate(model, None, PROMPT, seed=7, **kw)
    b = generate(model, None, PROMPT, seed=7, **kw)
    c = generate(model, None, PROMPT, seed=8, **kw)
    assert a.tokens == b.tokens and len(a.tokens) == 8
    assert a.tokens != c.tokens  # the seed matters (noise and draws)
    assert a.steps_per_token == [2] * 8 and a.mean_steps == 2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_equals_recomputation_token_for_token(model, temperature):
    kw = dict(num_steps=3, max_new_tokens=10, temperature=temperature, seed=3)
    cached = generate(model, None, PROMPT, use_cache=True, **kw)
    full = generate(model, None, PROMPT, use_cache=False, **kw)
    assert cached.tokens == full.tokens


def test_cache_logits_match_a_full_forward_with_the_same_states():
    """Prefill + one position at a time through the cache gives the full forward's logits at every position."""
    model = tiny_model(1, injection_type="add")
    ids = torch.tensor([[1, 9, 4, 33, 7, 2, 61]])
    s0 = torch.randn(1, ids.shape[1], 32)
    with torch.no_grad():
        e = model.embed(ids)
        s = s0
        for _ in range(3):
            s = model.core_step(s, e)
        full = model.decode(model.transformer.ln_f(s))
        cache = RecurrentKVCache(1, 2)
        outs = []
        for start, stop in [(0, 3), (3, 4), (4, 5), (5, 7)]:
            e = model.embed(ids[:, start:stop], cache)
            s = s0[:, start:stop]
            for t in range(3):
                s = model.core_step(s, e, cache, t)
            outs.append(model.decode(model.transformer.ln_f(s), cache))
            cache.commit(3)
    assert cache.length == 7 and sorted(cache.keys) == [-1, 0, 1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_reads_an_exited_position_at_its_last_iteration():
    """A position that ran 1 iteration is read at iteration 1 (0-based) from its iteration-0 keys (latest-m4)."""
    cache = RecurrentKVCache(1, 1)  # step indices: prelude 0, core iteration t -> 1 + t, coda -1
    k = lambda val, n=1: torch.full((1, 1, n, 2), float(val))  # noqa: E731
    for step, val in [(0, 10), (1, 11), (-1, 19)]:  # position 0: one core iteration
        cache.update(step, k(val), k(val))
    cache.commit(1)
    for step, val in [(0, 20), (1, 21), (2, 22), (-1, 29)]:  # position 1: two
        keys, _ = cache.update(step, k(val), k(val))
        assert keys[0, 0, :, 0].tolist() == [{0: 10, 1: 11, 2: 11, -1: 19}[step], val]
    cache.commit(2)
    keys, _ = cache.update(2, k(32), k(32))  # position 2 at iteration 1: 0 from iteration 0, 1 its own
    assert keys[0, 0, :, 0].tolist() == [11, 22, 32]
    cache.discard()


@pytest.mark.parametrize("criterion", CRITERIA)
def test_exit_threshold_zero_equals_fixed_depth(model, criterion):
    kw = dict(num_steps=4, max_new_tokens=6, temperature=1.0, seed=11)
    fixed = generate(model, None, PROMPT, **kw)
    adaptive = generate(model, None, PROMPT, exit_criterion=criterion, exit_threshold=0.0, **kw)
    assert adaptive.tokens == fixed.tokens
    assert adaptive.steps_per_token == [4] * 6


@pytest.mark.parametrize(
    "criterion,threshold",
    [("kl", 0.05), ("entropy-diff", 0.05), ("latent-diff", 0.5), ("argmax-stability", 1)],
)
def test_positive_threshold_uses_fewer_steps(model, criterion, threshold):
    out = generate(
        model, None, PROMPT, num_steps=10, max_new_tokens=6, seed=0,
        exit_criterion=criterion, exit_threshold=threshold,
    )  # fmt: skip
    assert len(out.steps_per_token) == 6
    assert 1 <= min(out.steps_per_token) and max(out.steps_per_token) <= 10
    assert out.mean_steps < 10


def test_exit_criteria_values():
    crit = ExitCriterion("kl", 1e-3, vocab=4)
    logits = torch.zeros(1, 4)  # uniform: KL to the uniform start is 0
    assert bool(crit(logits, torch.ones(1, 8))[0])
    crit = ExitCriterion("entropy-diff", 1e-3, vocab=4)
    assert not bool(crit(logits, torch.ones(1, 8))[0])  # |H - 100| is large
    assert bool(crit(logits, torch.ones(1, 8))[0])
    crit = ExitCriterion("latent-diff", 0.1, vocab=4)
    assert not bool(crit(logits, torch.ones(1, 8))[0])  # no previous state yet
    assert bool(crit(logits, torch.ones(1, 8) * 1.05)[0])  # relative change 0.05 / 1.05
    crit = ExitCriterion("argmax-stability", 2, vocab=4)
    peaked = torch.tensor([[0.0, 5.0, 0.0, 0.0]])
    assert [bool(crit(peaked, torch.ones(1, 8))[0]) for _ in range(3)] == [False, False, True]
    with pytest.raises(RavenError, match="unknown exit criterion"):
        ExitCriterion("cosine", 1.0, vocab=4)


def test_adaptive_exit_with_cache_in_a_batch(model):
    """Rows of a batch exit on their own: each equals its prompt generated alone (row b uses seed + b)."""
    prompts = torch.tensor([PROMPT, [9, 8, 7, 6, 5, 4]])
    kw = dict(num_steps=6, max_new_tokens=5, exit_criterion="latent-diff", exit_threshold=0.5)
    out = generate_batch(model, None, prompts, seed=4, **kw)
    for b, (row, r) in enumerate(zip(prompts, out)):
        single = generate(model, None, row, seed=4 + b, **kw)
        assert r.tokens == single.tokens and r.steps_per_token == single.steps_per_token
    assert out[0].steps_per_token != out[1].steps_per_token


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.85)) == [True, True, True, False]
    assert keep(filter_logits(logits, min_p=0.2)) == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    assert keep(filter_logits(logits, top_p=0.1)) == [True, False, False, False]  # always the top token
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)


def test_stop_tokens_and_errors(model):
    first = generate(model, None, PROMPT, num_steps=2, max_new_tokens=5).tokens
    out = generate(model, None, PROMPT, num_steps=2, max_new_tokens=5, stop_ids=[first[1]])
    assert out.tokens == first[:2] and out.stopped
    with pytest.raises(RavenError, match="block_size"):
        generate(model, None, PROMPT, max_new_tokens=100)
    with pytest.raises(RavenError, match="at least one core iteration"):
        generate(model, None, PROMPT, num_steps=0)
    with pytest.raises(RavenError, match="same length"):
        generate_batch(model, None, [[1, 2], [1, 2, 3]])


def test_chat_prompt_ids():
    tok = load_tokenizer("tokenizer/shakespeare_4k")
    ids = chat_prompt_ids(tok, "Hello <|end_turn|>", system="Be brief.")
    special = {
        tok.tokenizer.token_to_id(t): t for t in ("<|begin_header|>", "<|end_header|>", "<|end_turn|>")
    }
    rendered = [special.get(i, "") for i in ids]
    assert ids[0] == tok.bos_id
    assert rendered.count("<|begin_header|>") == 3 and rendered.count("<|end_turn|>") == 2  # text stays text
    text = tok.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.endswith("Hello <|end_turn|><|end_turn|><|begin_header|>Huginn<|end_header|>\n\n")
    assert text.startswith("<|begin_text|><|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>")
    assert encode_text(tok, "<|end_turn|>") != [tok.tokenizer.token_to_id("<|end_turn|>")]


def test_cli_on_an_export(tmp_path, capsys):
    from raven_titan.hf.export import export_hf

    model = tiny_model(vocab_size=4096, padding_multiple=64, block_size=128)
    export_hf(
        model, model.args, tmp_path / "exp", load_tokenizer("tokenizer/shakespeare_4k").path, torch.float32
    )
    argv = [
        "--export",
        str(tmp_path / "exp"),
        "--prompt",
        "To be",
        "--num-steps",
        "3",
        "--max-new-tokens",
        "6",
    ]
    assert main([*argv, "--json", "--temperature", "0.8", "--seed", "1"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*argv, "--json", "--temperature", "0.8", "--seed", "1", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == first["tokens"]
    assert main([*argv, "--chat", "--exit-criterion", "kl"]) == 0
    assert "depth per token: mean" in capsys.readouterr().err
    assert main(["--run", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: run folder not found")
