"""Byte-level BPE tokenizer: Huginn's recipe (spec section 9) at small scale, on the `tokenizers` library.

Layout of a vocabulary of size V:

- ids 0 .. 255: the 256 byte symbols of the byte-level alphabet (every string is encodable, no unknown token);
- ids 256 .. V-33: BPE merges learned from the training texts (if the texts are too small to learn that many,
  the gap is filled with `<|unused_i|>` placeholders so the layout below still holds);
- ids V-32 .. V-1: the 32 special tokens in Huginn's order (`SPECIAL_TOKENS`): BOS `<|begin_text|>` =
  V-32, EOS `<|end_text|>` = V-31, `<|begin_header|>` = V-30, `<|end_header|>` = V-29, `<|end_turn|>` =
  V-28, PAD `<|pad|>` = V-27, then the fill-in-the-middle, control and tool tokens. For V = 65536 this is
  exactly the published Huginn-0125 mapping (BOS 65504, EOS 65505, end_turn 65508, pad 65509).

Pre-tokenization is Huginn's "aeolian" regex (`AEOLIAN_REGEX`; single digits always isolated, LaTeX commands
kept whole, runs of newlines grouped) followed by the byte-level mapping. Differences from the Huginn export,
all deliberate: the Split uses behavior "isolated" instead of "removed + invert" (text the regex does not
match, e.g. combining marks or control characters, is kept as its own piece instead of being dropped, so every
string round-trips exactly); the 2,855 "manual" tokens (whitespace runs, code points 0..686, emoji ranges) are
not added (they do not fit a 4k vocabulary); BPE is trained with `tokenizers` instead of bpeasy. The regex
compiles unchanged in the Oniguruma engine that `tokenizers` uses.

`encode` adds no special tokens (there is no post-processor): document boundaries are added by the packer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from raven_titan.errors import RavenError

# Huginn's "aeolian" pre-tokenizer regex, verbatim from the reference (scripts/tokenizer_generation.py).
AEOLIAN_REGEX = (
    r"(\\n(?:e(?:wcommand|wenvironment|wline|wpage|wtheorem)|abla|e|eq|geq|gtr|leq|exists|ocite|oindent"
    r"|olinebreak|onumber|opagebreak|ormalsize|ot(?!(?:ag\b|\b)))\b|\n+|\\n(?!\b)|\p{N}{1,1}|(?:[ \t](?:==|!="
    r"|<=|>=|<<|>>|\*\*|//|\+=|-=|\*=|/=|%=|&=|\|=|\^=|<<=|>>=|\*\*=|//=|:=|\+\+|--|[\p{L}]+[''ʼ](?:\p{L}+)\b"
    r"|\\[a-zA-Z]+|\\{|\\}|{|}|\\\[|\\\]|\[|\]|\(|\)|_+|\||\+|-|\*|—|-|=|\*\*|^|[.,!?;()]|\$\$?|`+|\"+|\#+"
    r"|\p{N}+(?:st|nd|rd|th)|<0x[0-9A-Fa-f]{1,2}>)|[^\r\n\p{L}\p{N}]?\p{L}+|[\p{P}\p{S}])|\s+|\p{So})"
)

# Huginn's special-token list ("complete" layout) cut to the 32 slots of the published tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_text|>",
    "<|end_text|>",
    "<|begin_header|>",
    "<|end_header|>",
    "<|end_turn|>",
    "<|pad|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|...|>",
    "<|del|>",
    *(f"<|c_{i}|>" for i in range(10)),
    "<|?|>",
    "<|&|>",
    "<|!|>",
    "<|-|>",
    "<|+|>",
    "<|interrupt|>",
    "<|>>-|>",
    "<|-<<|>",
    "<|->>|>",
    "<|<<-|>",
)
NUM_SPECIAL = 32
assert len(SPECIAL_TOKENS) == NUM_SPECIAL
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|begin_text|>", "<|end_text|>", "<|pad|>"
MAX_TOKEN_LENGTH = 32  # characters per learned token (Huginn: bpeasy max_token_length=32)

# Spec section 9.4: the published Huginn-0125 chat template, shortened. Role "assistant" is shown as "Huginn".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] in ['assistant', 'Huginn'] %}"
    "<|begin_header|>Huginn<|end_header|>\n\n"
    "{% generation %}{{ message['content'] | trim }}<|end_turn|>{% endgeneration %}"
    "{% else %}<|begin_header|>{{ message['role'] }}<|end_header|>\n\n"
    "{{ message['content'] | trim }}<|end_turn|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|begin_header|>Huginn<|end_header|>\n\n"
    "{% else %}{{ eos_token }}{% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TokenizerInfo:
    tokenizer: Tokenizer
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    path: Path
    fingerprint: str
    """Hash of the tokenizer's content (`tokenizer_fingerprint`); names the prepared data built with it."""


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(AEOLIAN_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`; the result has exactly `vocab_size` ids, specials at the top 32.

    Deterministic: the same texts in the same order give the same vocabulary and merges.
    """
    min_size = 256 + NUM_SPECIAL
    if vocab_size < min_size:
        raise RavenError(
            f"tokenizer vocab_size {vocab_size} is too small: it must be >= {min_size} "
            "(256 bytes + 32 specials)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_SPECIAL,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        max_token_length=MAX_TOKEN_LENGTH,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    learned = tok.get_vocab_size(with_added_tokens=False)
    fill = [f"<|unused_{i}|>" for i in range(vocab_size - NUM_SPECIAL - learned)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*fill, *SPECIAL_TOKENS)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    assert tok.token_to_id(BOS_TOKEN) == vocab_size - NUM_SPECIAL
    return tok


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """16 hex digits identifying the tokenizer's content (vocabulary, merges, pipeline), not formatting."""
    canonical = json.dumps(
        json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def save_tokenizer(tok: Tokenizer, folder: str | Path, model_max_length: int = 4096) -> Path:
    """Write `tokenizer.json` and a Hugging Face style `tokenizer_config.json` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / TOKENIZER_FILE), pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder


def resolve_tokenizer_path(folder: str | Path) -> Path:
    """Absolute paths as given; relative ones against the working directory if they exist there, else against
    the repository root (the same rule as the config's other paths)."""
    path = Path(folder).expanduser()
    if path.is_absolute():
        return path
    return path.resolve() if path.exists() else REPO_ROOT / path


def load_tokenizer(folder: str | Path) -> TokenizerInfo:
    """Load `folder/tokenizer.json` (+ bos/eos/pad names from `tokenizer_config.json` when present)."""
    path = resolve_tokenizer_path(folder)
    file = path / TOKENIZER_FILE
    if not file.is_file():
        raise RavenError(
            f"tokenizer not found: {file} does not exist; set data.tokenizer to a folder holding "
            "tokenizer.json (default: tokenizer/shakespeare_4k) or train one with "
            "tokenizer/train_tokenizer.py"
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises plain Exception subclasses
        raise RavenError(f"cannot read tokenizer {file}: {e}") from None
    names = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config_file = path / CONFIG_FILE
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise RavenError(f"cannot parse {config_file}: {e}") from None
        for key in names:
            value = config.get(key)
            if isinstance(value, dict):  # {"content": "...", ...} form written by transformers
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    ids = {}
    for key, name in names.items():
        ids[key] = tok.token_to_id(name)
        if ids[key] is None:
            raise RavenError(
                f"tokenizer {file} has no {key} {name!r} in its vocabulary (check {CONFIG_FILE})"
            )
    return TokenizerInfo(
        tokenizer=tok,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        bos_id=ids["bos_token"],
        eos_id=ids["eos_token"],
        pad_id=ids["pad_token"],
        path=path,
        fingerprint=tokenizer_fingerprint(tok),
    )
