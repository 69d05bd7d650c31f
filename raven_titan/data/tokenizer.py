"""Byte-level BPE tokenizer: Huginn's recipe (spec section 9) at small scale, on the `tokenizers` library.

Layout of a vocabulary of size V:

- ids 0 .. 255: the 256 byte symbols of the byte-level alphabet (every string is encodable, no unknown token);
- ids 256 .. V-33: BPE merges learned from the training texts, then the manual tokens if any (below); if
  the texts are too small to learn that many, the gap is filled with `<|unused_i|>` placeholders so the
  layout below still holds;
- ids V-32 .. V-1: the 32 special tokens in Huginn's order (`SPECIAL_TOKENS`): BOS `<|begin_text|>` =
  V-32, EOS `<|end_text|>` = V-31, `<|begin_header|>` = V-30, `<|end_header|>` = V-29, `<|end_turn|>` =
  V-28, PAD `<|pad|>` = V-27, then the fill-in-the-middle, control and tool tokens. For V = 65536 this is
  exactly the published Huginn-0125 mapping (BOS 65504, EOS 65505, end_turn 65508, pad 65509).

With manual tokens (`manual_tokens="huginn"` or `"whitespace"`, see `manual_token_list`) the BPE learns
V - 32 - |manual| tokens and the manual tokens that are not already in the vocabulary follow the learned ones
(Huginn appends its 2,855 manual tokens after bpeasy's BPE in the same way). Each added token gets a BPE merge
for every split of it into two vocabulary entries, so the BPE can reach it (a multi-byte character whose byte
prefixes are not in the vocabulary gets those prefixes added too; if that overflows the budget, the last
learned merges are dropped, which equals training a slightly smaller BPE).

Pre-tokenization is Huginn's "aeolian" regex (`AEOLIAN_REGEX`; single digits always isolated, LaTeX commands
kept whole, runs of newlines grouped) followed by the byte-level mapping. Differences from the Huginn export,
all deliberate: the Split uses behavior "isolated" instead of "removed + invert" (text the regex does not
match, e.g. combining marks or control characters, is kept as its own piece instead of being dropped, so every
string round-trips exactly); manual tokens that are already learned are not duplicated as
`<|reserved_token_i|>` placeholders (their slots end up as `<|unused_i|>` fill before the specials); BPE is
trained with `tokenizers` instead of bpeasy. The regex compiles unchanged in the Oniguruma engine that
`tokenizers` uses. The committed 4k Shakespeare tokenizer uses no manual tokens (`manual_tokens="none"`).

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
MANUAL_TOKEN_SETS = ("huginn", "whitespace", "none")
# Huginn's manual code-point ranges after U+0000..U+02AE and the seal: emoji, then math (inclusive bounds).
_MANUAL_RANGES = (
    (0x1F600, 0x1F64F),
    (0x1F300, 0x1F5FF),
    (0x1F680, 0x1F6FF),
    (0x1F900, 0x1F9FF),
    (0x2600, 0x26FF),
    (0x2700, 0x27BF),
    (0x2150, 0x218F),
    (0x2190, 0x21FF),
    (0x2200, 0x22FF),
)

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

ASSISTANT_ROLES = ("assistant", "gpt", "Huginn")  # rendered as "Huginn" (spec sections 8.1 and 9.4)


def chat_segments(messages: Iterable[tuple[str, str]]) -> list[tuple[str, bool]]:
    """Huginn's pre-training chat rendering (spec 9.4 without BOS/EOS) as (text, is_special_token) pieces:
    per message `<|begin_header|>` role `<|end_header|>` "\\n\\n" + trimmed content `<|end_turn|>`. Keeping the
    special tokens apart lets the caller encode them as special ids while the text (which may itself contain
    special-token names) is encoded as plain text. `"".join(text)` is the rendered string."""
    out: list[tuple[str, bool]] = []
    for role, content in messages:
        role = "Huginn" if role in ASSISTANT_ROLES else role
        out += [
            ("<|begin_header|>", True),
            (role, False),
            ("<|end_header|>", True),
            ("\n\n" + content.strip(), False),
            ("<|end_turn|>", True),
        ]
    return out


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


def manual_token_list(name: str) -> list[str]:
    """Huginn's manual tokens (spec section 9.1), in its order, without repeats.

    - ``"huginn"``: the 2,855-entry list (2,850 distinct): quote tokens, runs of 1-16 spaces / newlines /
      tabs, every code point U+0000..U+02AE, the seal emoji, six emoji ranges, three math ranges, "Huginn";
    - ``"whitespace"``: only the quote tokens and the whitespace runs (54; fits small vocabularies);
    - ``"none"``: no manual tokens (the committed 4k tokenizer).
    """
    if name not in MANUAL_TOKEN_SETS:
        raise RavenError(f"unknown manual token set {name!r}: expected one of {', '.join(MANUAL_TOKEN_SETS)}")
    if name == "none":
        return []
    tokens = ['"""', "'''", '"', "''", 'f"', "f'"]
    tokens += [c * n for c in (" ", "\n", "\t") for n in range(1, 17)]
    if name == "huginn":
        tokens += [chr(i) for i in range(687)] + ["\U0001f9ad"]
        for lo, hi in _MANUAL_RANGES:
            tokens += [chr(i) for i in range(lo, hi + 1)]
        tokens.append("Huginn")
    return list(dict.fromkeys(tokens))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of the ByteLevel pre-tokenizer)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = _bytes_to_unicode()


def _byte_level(text: str) -> str:
    return "".join(_BYTE_CHARS[b] for b in text.encode("utf-8"))


def _manual_additions(pieces: Iterable[str], known: set[str]) -> list[str]:
    """New vocabulary entries for `pieces` (byte-level strings), each reachable by one merge of two entries:
    a piece with no split into two known entries gets its prefix added first (recursively)."""
    known, new = set(known), []

    def ensure(piece: str) -> None:
        if piece in known:
            return
        if not any(piece[:k] in known and piece[k:] in known for k in range(1, len(piece))):
            ensure(piece[:-1])  # single characters (bytes) are always known
        known.add(piece)
        new.append(piece)

    for piece in pieces:
        ensure(piece)
    return new


def _append_manual_tokens(tok: Tokenizer, manual: list[str], budget: int) -> Tokenizer:
    """`tok` (a trained BPE, no added tokens) with the manual tokens appended as BPE entries + merges, using at
    most `budget` ids in all; the last learned merges are dropped if the additions do not fit."""
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    pieces = [_byte_level(t) for t in manual]
    learned = len(vocab)
    while True:
        base = {t for t, i in vocab.items() if i < learned}
        new = _manual_additions(pieces, base)
        if learned + len(new) <= budget:
            break
        learned = budget - len(new)
        if learned < 256:
            raise RavenError(
                f"the manual tokens ({len(new)} entries) do not fit a vocabulary of {budget} + 32"
            )
    final = base | set(new)
    merges = [m for m in data["model"]["merges"] if m[0] + m[1] in base]
    for piece in new:
        merges += [[piece[:k], piece[k:]] for k in range(1, len(piece)) if {piece[:k], piece[k:]} <= final]
    vocab = {t: i for t, i in vocab.items() if i < learned}
    vocab.update({t: learned + k for k, t in enumerate(new)})
    data["model"]["vocab"], data["model"]["merges"] = vocab, merges
    return Tokenizer.from_str(json.dumps(data))


def train_tokenizer(texts: Iterable[str], vocab_size: int, manual_tokens: str = "none") -> Tokenizer:
    """Train a byte-level BPE on `texts`; the result has exactly `vocab_size` ids, specials at the top 32.

    `manual_tokens` names a set of `manual_token_list` appended after the learned tokens ("none" by default).
    Deterministic: the same texts in the same order give the same vocabulary and merges.
    """
    manual = manual_token_list(manual_tokens)
    min_size = 256 + NUM_SPECIAL + len(manual)
    if vocab_size < min_size:
        raise RavenError(
            f"tokenizer vocab_size {vocab_size} is too small: it must be >= {min_size} "
            f"(256 bytes + 32 specials + {len(manual)} manual tokens of set {manual_tokens!r})"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_SPECIAL - len(manual),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        max_token_length=MAX_TOKEN_LENGTH,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if manual:
        tok = _append_manual_tokens(tok, manual, vocab_size - NUM_SPECIAL)
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
