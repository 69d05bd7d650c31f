"""Tokenizer: special-token layout, exact round trips, digit splitting, determinism, the committed files."""

from __future__ import annotations

import json
import random

import pytest

from raven_titan.data.default_corpus import shakespeare_texts
from raven_titan.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from raven_titan.errors import RavenError

COMMITTED = "tokenizer/shakespeare_4k"


@pytest.fixture(scope="module")
def small_texts() -> list[str]:
    return shakespeare_texts(max_plays=2)


@pytest.fixture(scope="module")
def small_tok(small_texts):
    return train_tokenizer(small_texts, 1024)


@pytest.mark.parametrize("vocab_size", [1024, 300])
def test_specials_at_top_ids(small_texts, vocab_size, tmp_path):
    tok = train_tokenizer(small_texts, vocab_size)
    assert tok.get_vocab_size() == vocab_size
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == vocab_size - 32 + i
    info = load_tokenizer(save_tokenizer(tok, tmp_path / "tok"))
    assert (info.bos_id, info.eos_id, info.pad_id) == (vocab_size - 32, vocab_size - 31, vocab_size - 27)
    assert tok.token_to_id("<|end_turn|>") == vocab_size - 28
    assert tok.token_to_id("<|begin_header|>") == vocab_size - 30


def test_tiny_corpus_is_filled_so_specials_stay_on_top():
    tok = train_tokenizer(["to be or not to be"] * 5, 512)
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id("<|begin_text|>") == 480
    assert tok.id_to_token(479).startswith("<|unused_")


ROUND_TRIP_CASES = [
    "",
    "Hello, world!",
    "emoji 🦭🙂👍🏽 and a family 👨‍👩‍👧‍👦",
    "中文字符和日本語のテキスト、한국어",
    "e\u0301 a\u0308\u0323 Z\u0351\u0360\u035d combining marks",
    "control \x00\x01\x07\x1b[31m\x7f chars \u200b\u200d\ufeff",
    "   leading, \t\ttabs,\n\n\n\nnewline runs,     and trailing   ",
    "windows\r\nline\rendings\r\n",
    "\\newcommand{\\x}{1} \\nabla \\neq x += 1; y**=2 — «quotes» ‘curly’ ʼ",
    "RTL: مرحبا بالعالم עברית",
    "astral \U0001d54f\U0010fffd private \ue000",
    "numbers 3.14159 1st 22nd 0x1F <0x0A>",
]


@pytest.mark.parametrize("text", ROUND_TRIP_CASES)
def test_round_trip_exact(small_tok, text):
    assert small_tok.decode(small_tok.encode(text).ids) == text


def test_round_trip_random_unicode(small_tok):
    rng = random.Random(0)
    ranges = [
        (0, 0x7F),
        (0x80, 0x2FF),
        (0x300, 0x36F),
        (0x3000, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1F300, 0x1FAFF),
    ]
    for _ in range(200):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        text = "".join(chars)
        assert small_tok.decode(small_tok.encode(text).ids) == text, repr(text)


def test_special_names_in_text_are_specials_but_decode_back(small_tok):
    ids = small_tok.encode("a<|end_text|>b").ids
    assert small_tok.token_to_id("<|end_text|>") in ids
    assert small_tok.decode(ids, skip_special_tokens=False) == "a<|end_text|>b"


def test_single_digits_isolated(small_tok):
    assert small_tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    # a corpus full of repeated numbers: BPE would merge digits if the pre-tokenizer let it
    numeric = train_tokenizer(["12345 2024 12345 1999 12 34 12345 2024\n" * 200], 400)
    assert numeric.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert [p for p, _ in numeric.pre_tokenizer.pre_tokenize_str("x12345")][1:] == ["1", "2", "3", "4", "5"]
    enc = small_tok.encode("in 2024, 99 men")
    digits = [t for t in enc.tokens if any(c.isdigit() for c in t)]
    assert digits == ["2", "0", "2", "4", "9", "9"]


def test_training_is_deterministic(small_texts, small_tok):
    again = train_tokenizer(small_texts, 1024)
    assert again.to_str() == small_tok.to_str()
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(small_tok)
    other = train_tokenizer(small_texts[:1], 1024)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(small_tok)


def test_committed_tokenizer_loads_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the repository root
    info = load_tokenizer(COMMITTED)
    assert info.vocab_size == 4096
    assert (info.bos_id, info.eos_id, info.pad_id) == (4064, 4065, 4069)
    assert info.tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    config = json.loads((info.path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|begin_text|>" and config["model_max_length"] > 0


def test_committed_tokenizer_is_reproducible():
    info = load_tokenizer(COMMITTED)
    assert tokenizer_fingerprint(train_tokenizer(shakespeare_texts(), 4096)) == info.fingerprint


def test_missing_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(RavenError) as e:
        load_tokenizer(tmp_path / "nope")
    assert str(tmp_path / "nope" / "tokenizer.json") in str(e.value)
    assert "\n" not in str(e.value)


def test_too_small_vocab_refused(small_texts):
    with pytest.raises(RavenError, match="too small"):
        train_tokenizer(small_texts, 200)


def test_chat_template_renders():
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.ext import Extension

    class Generation(Extension):  # transformers' {% generation %} block, rendered as a plain block
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    info = load_tokenizer(COMMITTED)
    config = json.loads((info.path / "tokenizer_config.json").read_text())
    env = jinja2.Environment(extensions=[Generation])
    messages = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello."}]
    out = env.from_string(config["chat_template"]).render(
        messages=messages, bos_token="<|begin_text|>", eos_token="<|end_text|>", add_generation_prompt=False
    )
    assert out == (
        "<|begin_text|><|begin_header|>user<|end_header|>\n\nHi<|end_turn|>"
        "<|begin_header|>Huginn<|end_header|>\n\nHello.<|end_turn|><|end_text|>"
    )


def test_cli_trains_and_saves(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tokenizer" / "train_tokenizer.py"
    spec = importlib.util.spec_from_file_location("train_tokenizer_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    text = tmp_path / "a.txt"
    text.write_text("to be, or not to be: that is the question 12 34\n" * 50)
    assert cli.main([str(text), "--vocab-size", "320", "--out", str(tmp_path / "tok")]) == 0
    assert load_tokenizer(tmp_path / "tok").vocab_size == 320
    assert cli.main(["--out", str(tmp_path / "x")]) == 1  # neither files nor --shakespeare
