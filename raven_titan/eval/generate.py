"""Sampling text from a depth-recurrent model at a chosen test-time depth, with adaptive per-token exit.

    python -m raven_titan.eval.generate --run outputs/debug [--step N] --prompt "To be, or not" --num-steps 16
    python -m raven_titan.eval.generate --export exports/debug --chat --prompt "Who are you?" \\
        --temperature 0.8 --top-p 0.9 --exit-criterion kl --exit-threshold 5e-4

Python API: `load_model(run=..., step=...)` or `load_model(export=...)` gives (model, tokenizer); then
`generate(model, tokenizer, prompt_ids, num_steps=..., ...)` returns a `GenerationResult` (tokens, text,
steps_per_token); `generate_batch` does several prompts of the same length at once.

How it works (spec §1.11-1.12):

- Depth: every token runs `num_steps` core iterations (default: the model's mean_recurrence), or fewer with
  an exit criterion. The initial latent states of all positions are drawn once, from a generator seeded with
  `seed` (+ the row in a batch): the model's like-init noise times `init_scale`. A position's noise
  therefore does not depend on how the sequence is processed (cached or recomputed).
- KV cache across recurrences (`use_cache=True`, `RecurrentKVCache`): the prompt but its last token is
  prefilled at the full depth, then each token is one forward pass over one position that attends to the
  cached keys/values of the same step index. At a fixed depth this equals recomputing the whole sequence for
  every token (`use_cache=False`), token for token.
- Adaptive exit (`exit_criterion`): after each core iteration of a new token the logits (coda + head) are
  evaluated and the row stops iterating when the criterion holds; later tokens read an exited position's keys
  and values from its last iteration (`latest-m4`). Criteria, with threshold `thr`:
  `kl`: KL(p_{t-1} || p_t) < thr (p_0 uniform); `entropy-diff`: |H_t - H_{t-1}| < thr (H_0 = 100);
  `latent-diff`: ||s_t - s_{t-1}|| / ||s_t|| < thr; `argmax-stability`: the argmax has not changed for
  `thr` consecutive iterations (an integer). A threshold <= 0 never exits (= the fixed depth `num_steps`,
  which is also the maximum). Without the cache, each token re-runs the whole sequence and the criterion is
  tested on its last position. `steps_per_token` reports the iterations each generated token used.
- Sampling: temperature (0 = greedy), then top-k, top-p (nucleus), min-p (drop tokens below min_p times the
  top probability); ids beyond the tokenizer's vocabulary (embedding padding) are never sampled. Generation
  stops at EOS or `<|end_turn|>` (or `stop_ids`), or after `max_new_tokens`.
- Chat: `chat_prompt_ids` renders Huginn's template (spec §9.4): BOS, then per message
  `<|begin_header|>role<|end_header|>\\n\\n content <|end_turn|>`, then `<|begin_header|>Huginn<|end_header|>\\n\\n`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from raven_titan.errors import RavenError, run_command

EXIT_CRITERIA = ("kl", "entropy-diff", "latent-diff", "argmax-stability")


@dataclass
class GenerationResult:
    tokens: list[int]
    """Generated ids (not the prompt), the stop token included when one ended the generation."""
    text: str
    """The generated tokens decoded, without the final stop token."""
    steps_per_token: list[int]
    """Core iterations used to predict each token of `tokens`."""
    stopped: bool = False
    """True when a stop token ended the generation (False: max_new_tokens was reached)."""
    prompt_tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mean_steps(self) -> float:
        """Average depth (core iterations) per generated token."""
        return sum(self.steps_per_token) / max(len(self.steps_per_token), 1)


# ---- loading ----------------------------------------------------------------------------------------------------
def load_model(
    run: str | Path | None = None,
    step: int | None = None,
    export: str | Path | None = None,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
):
    """(model in eval mode, TokenizerInfo) from a training run's checkpoint (`run`, `step`: default the latest)
    or a Hugging Face export folder (`export`). The tokenizer defaults to the run's data.tokenizer or the
    export's own tokenizer files."""
    from raven_titan.config.manager import repo_path
    from raven_titan.data.tokenizer import load_tokenizer
    from raven_titan.models.raven.model import RavenForCausalLM

    if (run is None) == (export is None):
        raise RavenError(
            "give exactly one of --run (a training run folder) or --export (a Hugging Face folder)"
        )
    if run is not None:
        from raven_titan.hf.export import load_checkpoint_model

        run = Path(run).expanduser()
        if not run.is_dir():
            raise RavenError(f"run folder not found: {run}; pass the job.dump_folder of a training run")
        model, args, step, cfg = load_checkpoint_model(run, step)
        if tokenizer is None:
            tokenizer = (cfg.get("data") or {}).get("tokenizer")
            if not tokenizer:
                raise RavenError(f"{run}/config.json names no data.tokenizer; pass --tokenizer")
    else:
        from raven_titan.hf.load import args_from_hf_config, load_hf_weights

        folder = Path(export).expanduser()
        if not folder.is_dir():
            raise RavenError(f"export folder not found: {folder}")
        args = args_from_hf_config(folder)
        model = RavenForCausalLM(args)
        load_hf_weights(model, folder)
        if tokenizer is None:
            if not (folder / "tokenizer.json").is_file():
                raise RavenError(f"{folder} has no tokenizer.json; pass --tokenizer")
            tokenizer = folder
    info = load_tokenizer(repo_path(str(tokenizer)))
    if info.vocab_size > model.args.padded_vocab_size:
        raise RavenError(
            f"tokenizer {info.path} has {info.vocab_size} tokens but the model's embedding only "
            f"{model.args.padded_vocab_size}; pass the tokenizer the model was trained with"
        )
    model.to(device).eval()
    model.loaded_step = step
    return model, info


def chat_prompt_ids(
    tokenizer, messages: Sequence[tuple[str, str]] | str, system: str | None = None
) -> list[int]:
    """Token ids of Huginn's chat template for `messages` ((role, content) pairs, or one user message) with the
    generation prompt for the assistant ("Huginn") appended. Special tokens become their ids; the contents are
    encoded as plain text (a special-token name inside them stays text)."""
    from raven_titan.data.tokenizer import chat_segments

    if isinstance(messages, str):
        messages = [("user", messages)]
    messages = ([("system", system)] if system else []) + list(messages)
    segments = chat_segments(messages) + [
        ("<|begin_header|>", True),
        ("Huginn", False),
        ("<|end_header|>", True),
        ("\n\n", False),
    ]
    ids = [tokenizer.bos_id]
    for text, special in segments:
        if special:
            ids.append(_special_id(tokenizer, text))
        else:
            ids += encode_text(tokenizer, text)
    return ids


def encode_text(tokenizer, text: str, bos: bool = False) -> list[int]:
    """Plain-text ids (special-token names in `text` stay text), with BOS in front if asked."""
    tok = tokenizer.tokenizer
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        ids = tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = previous
    return ([tokenizer.bos_id] if bos else []) + list(ids)


def _special_id(tokenizer, name: str) -> int:
    idx = tokenizer.tokenizer.token_to_id(name)
    if idx is None:
        raise RavenError(f"tokenizer {tokenizer.path} has no {name} token; the chat template needs it")
    return idx


def default_stop_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_id]
    end_turn = tokenizer.tokenizer.token_to_id("<|end_turn|>")
    if end_turn is not None:
        ids.append(end_turn)
    return ids


# ---- sampling ---------------------------------------------------------------------------------------------------
def filter_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> Tensor:
    """(B, V) logits -> logits with filtered entries at -inf (temperature first, then top-k, top-p, min-p)."""
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p  # keeps the smallest prefix reaching top_p (always the first)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0:
        probs = logits.softmax(-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample_next(
    logits: Tensor, generator: torch.Generator | None, temperature: float, top_k, top_p, min_p
) -> Tensor:
    """(B,) next ids: argmax when temperature == 0, else a draw from the filtered distribution."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), temperature, top_k, top_p, min_p).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


# ---- exit criteria ----------------------------------------------------------------------------------------------
class ExitCriterion:
    """Per-row exit test after each core iteration (spec §1.12). `__call__(logits (B,V), state (B,E))` -> (B,)
    bool; a threshold <= 0 never exits."""

    def __init__(self, name: str, threshold: float, vocab: int):
        if name not in EXIT_CRITERIA:
            raise RavenError(f"unknown exit criterion {name!r}; choose one of {', '.join(EXIT_CRITERIA)}")
        self.name, self.threshold, self.vocab = name, float(threshold), vocab
        self.prev_logp: Tensor | None = None
        self.prev_entropy: Tensor | None = None
        self.prev_state: Tensor | None = None
        self.prev_argmax: Tensor | None = None
        self.stable: Tensor | None = None
        self.last_value: Tensor | None = None

    def __call__(self, logits: Tensor, state: Tensor) -> Tensor:
        B = logits.shape[0]
        logp = logits.float().log_softmax(-1)
        if self.name == "kl":
            prev = (
                self.prev_logp
                if self.prev_logp is not None
                else torch.full_like(logp, -torch.log(torch.tensor(float(self.vocab))).item())
            )
            value = (prev.exp() * (prev - logp)).sum(-1)  # KL(p_{t-1} || p_t)
            self.prev_logp = logp
        elif self.name == "entropy-diff":
            entropy = -(logp.exp() * logp).sum(-1)
            prev = self.prev_entropy if self.prev_entropy is not None else torch.full_like(entropy, 100.0)
            value = (entropy - prev).abs()
            self.prev_entropy = entropy
        elif self.name == "latent-diff":
            s = state.float()
            if self.prev_state is None:
                value = torch.full((B,), float("inf"), device=logits.device)
            else:
                value = (s - self.prev_state).norm(dim=-1) / s.norm(dim=-1).clamp_min(1e-12)
            self.prev_state = s
        else:  # argmax-stability: iterations in a row with the same argmax
            top = logits.argmax(-1)
            if self.prev_argmax is None:
                self.stable = torch.zeros(B, dtype=torch.long, device=logits.device)
            else:
                self.stable = torch.where(
                    top == self.prev_argmax, self.stable + 1, torch.zeros_like(self.stable)
                )
            self.prev_argmax = top
            self.last_value = self.stable
            if self.threshold <= 0:
                return torch.zeros(B, dtype=torch.bool, device=logits.device)
            return self.stable >= self.threshold
        self.last_value = value
        return value < self.threshold


# ---- one forward pass over new positions ---------------------------------------------------------------------------
def _initial_noise(model, batch: int, length: int, seed: int, init_scale: float) -> Tensor:
    """(B, length, E) initial states: like-init truncated normal per position; row b draws from a generator
    seeded with seed + b (so row b of a batch has the noise of a single prompt generated with seed + b)."""
    args = model.args
    if init_scale == 0:
        return torch.zeros(batch, length, args.n_embd)
    std = args.init_std
    s = torch.empty(batch, length, args.n_embd)
    for b in range(batch):
        gen = torch.Generator().manual_seed(seed + b)
        torch.nn.init.trunc_normal_(s[b], mean=0.0, std=std, a=-3 * std, b=3 * std, generator=gen)
    return s * (args.embed_scale * init_scale)


@torch.no_grad()
def _forward_positions(model, ids: Tensor, s0: Tensor, num_steps: int, cache, criterion, vocab: int):
    """Run new positions `ids` (B, S) through the model (after the cached ones if `cache`); returns the fp32
    logits of the last position (B, V) and the core iterations each row ran (B,)."""
    B = ids.shape[0]
    e = model.embed(ids, cache)
    state = s0.to(device=e.device, dtype=e.dtype)
    depth = torch.zeros(B, dtype=torch.long, device=e.device)
    active = torch.ones(B, dtype=torch.bool, device=e.device)
    exit_test = ExitCriterion(*criterion, vocab) if criterion is not None else None
    logits = None
    for t in range(num_steps):
        new = model.core_step(state, e, cache, t)
        state = torch.where(active[:, None, None], new, state)  # exited rows keep their state
        depth += active.long()
        if exit_test is not None:
            logits = model.decode(model.transformer.ln_f(state), cache)[:, -1]
            active &= ~exit_test(logits[:, :vocab], state[:, -1])
            if not bool(active.any()):
                break
    if exit_test is None:
        logits = model.decode(model.transformer.ln_f(state), cache)[:, -1]
    return logits, depth


# ---- generation ---------------------------------------------------------------------------------------------------
def _as_batch(prompt_ids) -> Tensor:
    if isinstance(prompt_ids, Tensor):
        t = prompt_ids.long()
    else:
        rows = list(prompt_ids)
        if rows and not isinstance(rows[0], list | tuple | Tensor):
            rows = [rows]
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise RavenError(
                f"prompts of a batch must have the same length (got {sorted(lengths)}); the model has no "
                "padding mask, so group prompts by length"
            )
        t = torch.tensor([[int(x) for x in r] for r in rows], dtype=torch.long)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] == 0:
        raise RavenError("the prompt is empty; give at least one token (e.g. BOS)")
    return t


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompt_ids,
    *,
    num_steps: int | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int = 0,
    exit_criterion: str | None = None,
    exit_threshold: float = 0.0,
    use_cache: bool = True,
    init_scale: float | None = None,
    stop_ids: Sequence[int] | None = None,
) -> list[GenerationResult]:
    """Generate for a batch of prompts of equal length ((B, S) ids); one GenerationResult per row.
    See `generate` for the arguments."""
    from raven_titan.models.raven.cache import RecurrentKVCache

    start = time.perf_counter()
    args = model.args
    num_steps = args.mean_recurrence if num_steps is None else int(num_steps)
    if num_steps < 1:
        raise RavenError(f"num_steps = {num_steps}: generation needs at least one core iteration per token")
    if max_new_tokens < 1:
        raise RavenError(f"max_new_tokens = {max_new_tokens} must be >= 1")
    if exit_criterion is not None and exit_criterion not in EXIT_CRITERIA:
        raise RavenError(
            f"unknown exit criterion {exit_criterion!r}; choose one of {', '.join(EXIT_CRITERIA)}"
        )
    if (
        temperature < 0
        or (top_p is not None and not 0 < top_p <= 1)
        or (min_p is not None and not 0 <= min_p <= 1)
    ):
        raise RavenError("sampling needs temperature >= 0, 0 < top_p <= 1 and 0 <= min_p <= 1")
    prompts = _as_batch(prompt_ids)
    B, P = prompts.shape
    total = P + max_new_tokens
    if total > args.block_size:
        raise RavenError(
            f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's block_size "
            f"{args.block_size}; shorten the prompt or lower --max-new-tokens"
        )
    vocab = tokenizer.vocab_size if tokenizer is not None else args.vocab_size
    if int(prompts.max()) >= args.padded_vocab_size or int(prompts.min()) < 0:
        raise RavenError("prompt ids outside the model's vocabulary")
    stops = set(
        default_stop_ids(tokenizer) if stop_ids is None and tokenizer is not None else (stop_ids or [])
    )
    device = next(model.parameters()).device
    scale = args.init_scale if init_scale is None else float(init_scale)
    noise = _initial_noise(model, B, total, seed, scale)
    sampler = torch.Generator().manual_seed(seed + 7919)
    criterion = (exit_criterion, exit_threshold) if exit_criterion is not None else None

    was_training = model.training
    model.eval()
    seq = prompts.to(device)
    cache = (
        RecurrentKVCache(args.n_layers_in_prelude, args.n_layers_in_recurrent_block) if use_cache else None
    )
    if cache is not None and P > 1:  # prefill all but the last prompt token at the full depth
        _forward_positions(model, seq[:, :-1], noise[:, : P - 1], num_steps, cache, None, vocab)
        cache.commit(num_steps)
    tokens = [[] for _ in range(B)]
    steps = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new_tokens):
        L = seq.shape[1]
        if cache is not None:
            logits, depth = _forward_positions(
                model, seq[:, -1:], noise[:, L - 1 : L], num_steps, cache, criterion, vocab
            )
            cache.commit(depth)
        else:
            logits, depth = _forward_positions(model, seq, noise[:, :L], num_steps, None, criterion, vocab)
        logits = logits[:, :vocab]
        nxt = sample_next(logits, sampler, temperature, top_k, top_p, min_p)
        for b in range(B):
            if not done[b]:
                tokens[b].append(int(nxt[b]))
                steps[b].append(int(depth[b]))
                done[b] = int(nxt[b]) in stops
        if all(done):
            break
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    if was_training:
        model.train()
    seconds = time.perf_counter() - start
    results = []
    for b in range(B):
        body = tokens[b][:-1] if done[b] else tokens[b]
        text = tokenizer.tokenizer.decode(body, skip_special_tokens=False) if tokenizer is not None else ""
        results.append(GenerationResult(tokens[b], text, steps[b], done[b], P, seconds))
    return results


def generate(
    model,
    tokenizer,
    prompt_ids,
    *,
    num_steps: int | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int = 0,
    exit_criterion: str | None = None,
    exit_threshold: float = 0.0,
    use_cache: bool = True,
    init_scale: float | None = None,
    stop_ids: Sequence[int] | None = None,
) -> GenerationResult:
    """Continue one prompt (a list or 1-D tensor of ids; usually starting with BOS).

    num_steps: core iterations per token (default the model's mean_recurrence; the maximum with an exit
    criterion). temperature 0 (default) is greedy; top_k / top_p / min_p filter the sampled distribution.
    seed fixes the initial latent states and the draws: the same call gives the same tokens.
    exit_criterion: None (fixed depth) or one of EXIT_CRITERIA, with exit_threshold (<= 0: never exit).
    use_cache: KV cache across recurrences (False: recompute the whole sequence per token; same tokens at a
    fixed depth). init_scale: scale of the initial-state noise (default the model's; 0: zero state).
    stop_ids: default EOS and <|end_turn|>. tokenizer: a TokenizerInfo (`load_tokenizer`) or None (no text).
    """
    prompt = _as_batch(prompt_ids)
    if prompt.shape[0] != 1:
        raise RavenError("generate() takes one prompt; use generate_batch() for several")
    return generate_batch(
        model, tokenizer, prompt, num_steps=num_steps, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, exit_criterion=exit_criterion,
        exit_threshold=exit_threshold, use_cache=use_cache, init_scale=init_scale, stop_ids=stop_ids,
    )[0]  # fmt: skip


# ---- command line -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raven_titan.eval.generate",
        description="Sample text from a checkpoint of a training run or a Hugging Face export at a chosen "
        "test-time depth, optionally with adaptive per-token exit; reports the average depth per token.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="training run folder (job.dump_folder) with checkpoints")
    src.add_argument("--export", type=Path, help="Hugging Face export folder (Huginn layout)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of --run (default: the latest)")
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer folder (default: the run's / export's)"
    )
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Huginn's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--no-bos", dest="bos", action="store_false", help="do not put BOS before a plain prompt")
    p.add_argument(
        "--num-steps", type=int, default=None, help="core iterations per token (default: mean_recurrence)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exit-criterion", choices=EXIT_CRITERIA, default=None, help="adaptive per-token exit")
    p.add_argument(
        "--exit-threshold", type=float, default=None,
        help="exit when the criterion is below this (argmax-stability: stable iterations); defaults: kl 5e-4, "
        "entropy-diff 1e-3, latent-diff 0.03, argmax-stability 5",
    )  # fmt: skip
    p.add_argument(
        "--init-scale", type=float, default=None, help="initial-state noise scale (default: the model's)"
    )
    p.add_argument(
        "--no-cache", dest="use_cache", action="store_false", help="recompute the sequence per token"
    )
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    return p


def _exit_rule(criterion: str, threshold: float) -> str:
    if criterion == "argmax-stability":
        return f"argmax unchanged for {threshold:g} iterations"
    return f"{criterion} < {threshold:g}"


DEFAULT_THRESHOLDS = {"kl": 5e-4, "entropy-diff": 1e-3, "latent-diff": 0.03, "argmax-stability": 5}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        device = ns.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise RavenError("--device cuda but no CUDA device is visible")
        model, tok = load_model(ns.run, ns.step, ns.export, ns.tokenizer, device)
        if ns.chat:
            ids = chat_prompt_ids(tok, ns.prompt, ns.system)
        else:
            ids = encode_text(tok, ns.prompt, bos=ns.bos)
        threshold = ns.exit_threshold
        if threshold is None:
            threshold = DEFAULT_THRESHOLDS.get(ns.exit_criterion, 0.0)
        result = generate(
            model, tok, ids, num_steps=ns.num_steps, max_new_tokens=ns.max_new_tokens,
            temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, min_p=ns.min_p, seed=ns.seed,
            exit_criterion=ns.exit_criterion, exit_threshold=threshold, use_cache=ns.use_cache,
            init_scale=ns.init_scale,
        )  # fmt: skip
        max_steps = ns.num_steps or model.args.mean_recurrence
        summary = (
            f"{len(result.tokens)} tokens in {result.seconds:.2f} s; depth per token: mean {result.mean_steps:.2f} "
            f"(min {min(result.steps_per_token)}, max {max(result.steps_per_token)}; limit {max_steps})"
            + (f", exit: {_exit_rule(ns.exit_criterion, threshold)}" if ns.exit_criterion else "")
        )
        if ns.json:
            print(json.dumps({
                "text": result.text, "tokens": result.tokens, "steps_per_token": result.steps_per_token,
                "mean_steps": result.mean_steps, "stopped": result.stopped, "step": model.loaded_step,
            }))  # fmt: skip
        else:
            print(result.text, flush=True)
        print(summary, file=sys.stderr)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
