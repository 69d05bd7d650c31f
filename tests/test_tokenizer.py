"""Tokenizer: special-token layout, exact round trips, digit splitting, determinism, the committed files."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from raven_titan.data.default_corpus import shakespeare_texts
from raven_titan.data.sources import ReadStats
from raven_titan.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    manual_token_list,
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
    args = [str(text), "--vocab-size", "320", "--manual-tokens", "none", "--out", str(tmp_path / "tok")]
    assert cli.main(args) == 0
    assert load_tokenizer(tmp_path / "tok").vocab_size == 320
    assert cli.main(["--out", str(tmp_path / "x")]) == 1  # neither files nor --shakespeare
    assert (
        cli.main([str(text), "--vocab-size", "320", "--out", str(tmp_path / "y")]) == 1
    )  # no room for manual


# ---- Huginn recipe: manual tokens, full-size layout, sources, transformers ------------------------------


def load_tokenizer_cli():
    script = Path(__file__).resolve().parents[1] / "tokenizer" / "train_tokenizer.py"
    spec = importlib.util.spec_from_file_location("train_tokenizer_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.fixture(scope="module")
def huginn_tok(small_texts):
    return train_tokenizer(small_texts, 4096, manual_tokens="huginn")


def test_manual_token_sets():
    huginn = manual_token_list("huginn")
    assert len(huginn) == 2850 and len(set(huginn)) == 2850  # Huginn's 2,855 minus 5 repeats
    assert huginn[:6] == ['"""', "'''", '"', "''", 'f"', "f'"] and huginn[-1] == "Huginn"
    assert " " * 16 in huginn and "\t" * 16 in huginn and "\U0001f9ad" in huginn and "\u22ff" in huginn
    assert manual_token_list("whitespace") == huginn[:54] and manual_token_list("none") == []
    with pytest.raises(RavenError, match="unknown manual token set"):
        manual_token_list("bpeasy")


def test_huginn_manual_tokens_are_single_tokens(huginn_tok):
    tok = huginn_tok
    assert tok.get_vocab_size() == 4096
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == 4064 + i
    for run in [c * n for c in (" ", "\n", "\t") for n in range(1, 17)]:
        assert len(tok.encode(run).ids) == 1, repr(run)
    for text in ["é", "ʮ", "\u00a0", "∀", "→", "⅓", "😀", "🦭", "🚀", "☃", "✂", "Huginn"]:
        assert len(tok.encode(text).ids) == 1, text
    assert len(tok.encode(" " * 17).ids) == 2
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    for text in ROUND_TRIP_CASES:
        assert tok.decode(tok.encode(text).ids) == text


def test_whitespace_manual_tokens_fit_a_small_vocab(small_texts):
    tok = train_tokenizer(small_texts, 512, manual_tokens="whitespace")
    assert tok.get_vocab_size() == 512 and tok.token_to_id("<|begin_text|>") == 480
    assert [len(tok.encode(" " * n).ids) for n in range(1, 17)] == [1] * 16
    with pytest.raises(RavenError, match="2850 manual tokens"):
        train_tokenizer(small_texts, 2048, manual_tokens="huginn")


def test_cli_default_is_the_full_huginn_layout(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    rows = [
        {"text": f"Document {i}: to be, or not to be; that is the question {i * 37}."} for i in range(300)
    ]
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    (tmp_path / "b.txt").write_text(
        "Whose woods these are I think I know.\n\nHis house is in the village though."
    )
    cli = load_tokenizer_cli()
    out = tmp_path / "tok"
    assert (
        cli.main([str(jsonl), str(tmp_path / "b.txt"), "--max-docs-per-source", "100", "--out", str(out)])
        == 0
    )
    info = load_tokenizer(out)
    assert info.vocab_size == 65536
    tok = info.tokenizer
    published = {65504: "<|begin_text|>", 65505: "<|end_text|>", 65506: "<|begin_header|>"}
    published |= {65507: "<|end_header|>", 65508: "<|end_turn|>", 65509: "<|pad|>"}
    assert {i: tok.id_to_token(i) for i in published} == published
    assert (info.bos_id, info.eos_id, info.pad_id) == (65504, 65505, 65509)
    assert len(tok.encode("\t" * 9).ids) == 1 and tok.encode("2024").tokens == ["2", "0", "2", "4"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|begin_header|>Huginn<|end_header|>" in config["chat_template"]


def test_sample_source_is_a_seeded_uniform_sample(tmp_path):
    cli = load_tokenizer_cli()
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i} " * 10}) + "\n" for i in range(100)))

    def sample(limit, seed, max_chars=0):
        return cli.sample_source(str(src), limit, seed, ReadStats(), max_chars=max_chars)

    a = sample(10, 1)
    assert len(a) == 10 and a == sample(10, 1) and a != sample(10, 2)
    assert len(set(a)) == 10 and max(int(t.split()[1]) for t in a) >= 10  # not just the first rows
    assert len(sample(0, 1)) == 100 and sample(5, 1, max_chars=7) == [t[:7] for t in sample(5, 1)]
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    chats = [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]] * 2
    pq.write_table(pa.table({"messages": chats}), tmp_path / "c.parquet")
    chat_texts = cli.sample_source(str(tmp_path / "c.parquet"), 0, 0, ReadStats())
    assert chat_texts == ["Q\nA", "Q\nA"]  # contents joined by newlines, no template (spec 9.1)


def test_transformers_loads_the_tokenizer(tmp_path, huginn_tok):
    transformers = pytest.importorskip("transformers")
    folder = save_tokenizer(huginn_tok, tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (4064, 4065, 4069) and len(hf) == 4096
    text = "Hello, world 12345 🦭\n\n\tdone"
    assert hf.encode(text, add_special_tokens=False) == huginn_tok.encode(text).ids
    assert hf.decode(hf.encode(text, add_special_tokens=False)) == text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert hf.apply_chat_template(messages, tokenize=False) == (
        "<|begin_text|><|begin_header|>user<|end_header|>\n\nHi<|end_turn|>"
        "<|begin_header|>Huginn<|end_header|>\n\nHello.<|end_turn|><|end_text|>"
    )
