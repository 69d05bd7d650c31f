"""A built-in reasoning task where more test-time depth should help, with no download.

Tasks (one problem = one document; the question is the prompt, the answer follows it directly, no
chain of thought, so all the work has to happen in the latent recurrence):

- ``chase`` (default): multi-hop variable binding / pointer chasing. Several chains of assignments, each
  starting at a distinct digit, interleaved in a random order that keeps every chain's order; the question
  asks for the value of the last variable of one chain, which takes `hops` look-ups::

      f=3;q=7;k=f;z=k;c=q;z?3        (z -> k -> f -> 3: 3 hops; the q-chain is a distractor)

  Difficulty = the number of hops. In training, every chain of a problem draws its length from the training
  range, so the length of a chain does not give the answer away, and a document asks `queries` questions
  (default 8: the chain end above, then random other variables, ``...;z?3;c?7;k?3``) so more of its tokens
  are reasoning targets. Evaluation asks one question per prompt; harder problems have a longer question
  chain among distractors of the training range (so mostly the hops grow, not the context).
- ``add``: multi-digit addition, ``4821+397=5218``; difficulty = digits of the first operand (the second
  has 1 .. as many digits).

Commands::

    python -m raven_titan.eval.reasoning prepare --out outputs/reasoning [--task chase] [--difficulty 1 4]
    ./run_train.sh --job.config_file train_configs/reasoning_cpu.toml
    python -m raven_titan.eval.reasoning evaluate --run outputs/reasoning_cpu [--harder 5 8] [--out DIR]

`prepare` writes `<out>/tokenizer` (by default a byte-level tokenizer: 256 byte ids + Huginn's 32 specials,
no merges; every character of the task is one token and the 288-entry embedding keeps a tiny model fast) and
`<out>/data`, a prepared dataset folder (`raven_titan.data.prepare.build_dataset`, "drop" packing so every row
starts at a problem) whose dataset.json records the task under "reasoning". `evaluate` prompts with the
question (after BOS), greedily decodes the answer with the KV cache at each test-time depth (the answer ends
at EOS or ";"), and reports exact-match accuracy on in-distribution problems (the training difficulty range)
and harder ones, overall and per difficulty: JSON + a PNG plot. Evaluation problems come from another seed
than the training data (a repeat of a training problem is possible in principle but astronomically rare:
letters, digits and the interleaving are all random).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from raven_titan.errors import RavenError, run_command

TASKS = ("chase", "add")
VARIABLES = string.ascii_lowercase
BYTES_TOKENIZER = "bytes"


@dataclass
class Problem:
    prompt: str
    """The question: what evaluation prompts with (after BOS)."""
    answer: str
    """The exact text that must follow the prompt (then EOS)."""
    difficulty: int
    """Hops (chase) or digits of the first operand (add)."""
    extra: str = ""
    """Training only: more questions about the same statements after the answer (";z?3;k?3")."""

    @property
    def text(self) -> str:
        """The training document."""
        return self.prompt + self.answer + self.extra


# ---- generators -------------------------------------------------------------------------------------------------
def chase_problem(
    rng: random.Random,
    hops: int,
    chains: int = 3,
    chain_range: tuple[int, int] | None = None,
    queries: int = 1,
) -> Problem:
    """One pointer-chasing problem whose question takes `hops` look-ups; the `chains - 1` distractor chains
    draw their lengths from `chain_range` (default: 1 .. hops). With `queries` > 1, the document goes on with
    questions about other variables (any chain, any depth), each followed by its answer: more reasoning
    targets per training document."""
    lo, hi = chain_range or (1, hops)
    if hops < 1 or chains < 1 or lo < 1 or hi < lo:
        raise RavenError(
            f"chase: need hops >= 1, chains >= 1 and a valid chain range; got {hops}, {chains}, {lo}..{hi}"
        )
    if chains > 10:
        raise RavenError(f"chase: at most 10 chains (one distinct digit each); got {chains}")
    lengths = [hops] + [rng.randint(lo, hi) for _ in range(chains - 1)]
    if sum(lengths) > len(VARIABLES):
        raise RavenError(
            f"chase: {chains} chains of up to {max(lengths)} hops need {sum(lengths)} variables; only "
            f"{len(VARIABLES)} letters exist (lower the hops or the chains)"
        )
    names = rng.sample(VARIABLES, sum(lengths))
    roots = rng.sample(string.digits, chains)
    chain_vars, k = [], 0
    for n in lengths:
        chain_vars.append(names[k : k + n])
        k += n
    order = [c for c, n in enumerate(lengths) for _ in range(n)]
    rng.shuffle(order)  # an interleaving of the chains; each chain keeps its own order
    nxt = [0] * chains
    statements = []
    for c in order:
        i = nxt[c]
        source = roots[c] if i == 0 else chain_vars[c][i - 1]
        statements.append(f"{chain_vars[c][i]}={source}")
        nxt[c] += 1
    query = chain_vars[0][-1]
    value = {v: roots[c] for c, names_c in enumerate(chain_vars) for v in names_c}
    others = [v for v in value if v != query]
    extra = "".join(f";{v}?{value[v]}" for v in rng.sample(others, min(queries - 1, len(others))))
    return Problem(";".join(statements) + f";{query}?", roots[0], hops, extra)


def addition_problem(rng: random.Random, digits: int) -> Problem:
    """`a+b=` with a of exactly `digits` digits and b of 1 .. digits digits; the sum by schoolbook carries."""
    if digits < 1:
        raise RavenError(f"add: digits must be >= 1; got {digits}")
    a = str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1))
    nb = rng.randint(1, digits)
    b = str(rng.randint(10 ** (nb - 1) if nb > 1 else 0, 10**nb - 1))
    out, carry = [], 0
    for i in range(max(len(a), len(b))):
        da = int(a[-1 - i]) if i < len(a) else 0
        db = int(b[-1 - i]) if i < len(b) else 0
        carry, d = divmod(da + db + carry, 10)
        out.append(str(d))
    if carry:
        out.append(str(carry))
    return Problem(f"{a}+{b}=", "".join(reversed(out)), digits)


def make_problems(
    task: str,
    n: int,
    difficulty: tuple[int, int],
    seed: int,
    chains: int = 3,
    balanced: bool = False,
    chain_range: tuple[int, int] | None = None,
    queries: int = 1,
) -> list[Problem]:
    """`n` problems with difficulty in [lo, hi]: uniformly at random, or in equal shares with `balanced`.
    For chase, the distractor chains draw their lengths from `chain_range` (default: [lo, hi], the same
    range as the question's chain)."""
    lo, hi = difficulty
    if task not in TASKS:
        raise RavenError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if lo < 1 or hi < lo:
        raise RavenError(f"difficulty range {lo}..{hi}: need 1 <= lo <= hi")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = lo + i % (hi - lo + 1) if balanced else rng.randint(lo, hi)
        if task == "chase":
            out.append(chase_problem(rng, d, chains, chain_range or (lo, hi), queries))
        else:
            out.append(addition_problem(rng, d))
    return out


# ---- an independent solver ----------------------------------------------------------------------------------------
_STATEMENT = re.compile(r"([a-z])=([a-z0-9])")


def solve(prompt: str) -> tuple[str, int]:
    """(answer, difficulty) computed from the question text alone: follows the chase pointers through a
    dictionary, or adds with Python integers. Used to check the generators."""
    m = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    if m:
        return str(int(m.group(1)) + int(m.group(2))), len(m.group(1))
    m = re.fullmatch(r"((?:[a-z]=[a-z0-9];)+)([a-z])\?", prompt)
    if not m:
        raise ValueError(f"not a reasoning question: {prompt!r}")
    binding: dict[str, str] = {}
    for name, source in _STATEMENT.findall(m.group(1)):
        if name in binding:
            raise ValueError(f"{name} is assigned twice in {prompt!r}")
        if source.isalpha() and source not in binding:
            raise ValueError(f"{source} is used before it is assigned in {prompt!r}")
        binding[name] = source
    value, hops = m.group(2), 0
    while value.isalpha():
        value, hops = binding[value], hops + 1
    return value, hops


# ---- preparing training data --------------------------------------------------------------------------------------
def byte_tokenizer():
    """Byte-level tokenizer without merges: 256 byte ids + Huginn's 32 special tokens (288 ids)."""
    from raven_titan.data.tokenizer import NUM_SPECIAL, train_tokenizer

    return train_tokenizer(["0123456789 abcdefghijklmnopqrstuvwxyz=;?+"], vocab_size=256 + NUM_SPECIAL)


def prepare(
    out: str | Path,
    task: str = "chase",
    difficulty: tuple[int, int] = (1, 4),
    num_train: int = 200_000,
    seq_len: int = 128,
    seed: int = 0,
    chains: int = 3,
    tokenizer: str = BYTES_TOKENIZER,
    val_fraction: float = 0.02,
    queries: int = 8,
) -> Path:
    """Write `<out>/tokenizer` (the byte tokenizer, unless `tokenizer` names a folder) and `<out>/data` (a
    prepared dataset of `num_train` problems for `data.dataset`, chase documents with `queries` questions
    each). Returns `<out>/data`."""
    from raven_titan.data.prepare import build_dataset
    from raven_titan.data.tokenizer import load_tokenizer, save_tokenizer

    out = Path(out)
    if (out / "data").exists():
        raise RavenError(f"{out / 'data'} already exists; remove it or choose another --out")
    if tokenizer == BYTES_TOKENIZER:
        tok_dir = out / "tokenizer"
        save_tokenizer(byte_tokenizer(), tok_dir, model_max_length=seq_len * 4)
    else:
        from raven_titan.config.manager import repo_path

        tok_dir = repo_path(tokenizer)
    info = load_tokenizer(tok_dir)
    problems = make_problems(task, num_train, difficulty, seed, chains, queries=queries)
    for p in problems[:200]:  # the prompt must tokenize as a prefix of the document
        prompt_ids = info.tokenizer.encode(p.prompt, add_special_tokens=False).ids
        doc_ids = info.tokenizer.encode(p.text, add_special_tokens=False).ids
        if doc_ids[: len(prompt_ids)] != prompt_ids:
            raise RavenError(f"tokenizer {info.path} splits {p.text!r} across the question/answer boundary")
    spec = {
        "task": task, "difficulty": list(difficulty), "chains": chains, "queries": queries,
        "num_train": num_train, "seed": seed, "example": problems[0].text,
    }  # fmt: skip
    return build_dataset(
        [p.text for p in problems], out / "data", info, seq_len, val_fraction, seed, policy="drop",
        meta={"reasoning": spec},
    )  # fmt: skip


def read_spec(dataset: str | Path) -> dict:
    """The "reasoning" record of a prepared dataset's dataset.json."""
    path = Path(dataset) / "dataset.json"
    try:
        spec = json.loads(path.read_text()).get("reasoning")
    except FileNotFoundError:
        raise RavenError(
            f"{path} not found; pass a folder written by `reasoning prepare` (its data/)"
        ) from None
    if not spec:
        raise RavenError(f"{path} has no 'reasoning' record; was it written by `reasoning prepare`?")
    return spec


# ---- evaluation ---------------------------------------------------------------------------------------------------
def default_depths(mean_recurrence: int) -> list[int]:
    """1 up to 4x the training mean: 1, 2, 3 and the mean times 1/4, 1/2, 3/4, 1, 1.5, 2, 3, 4."""
    factors = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4)
    return sorted({1, 2, 3} | {max(1, round(mean_recurrence * f)) for f in factors})


def accuracy_by_depth(
    model,
    tokenizer,
    problems: list[Problem],
    depths: list[int],
    seed: int = 0,
    batch_size: int = 64,
    init_scale: float | None = None,
) -> dict:
    """Exact-match accuracy of greedy answers (KV cache) at each depth: overall and per difficulty. The answer
    is the text generated before EOS or ";" (where a training document would ask its next question); it must
    equal the expected answer exactly. Prompts are grouped by token length, so a batch needs no padding."""
    from raven_titan.eval.generate import encode_text, generate_batch

    stop_ids = [tokenizer.eos_id, *encode_text(tokenizer, ";")]  # chase documents go on with ";next?"
    groups: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
    for i, p in enumerate(problems):
        ids = encode_text(tokenizer, p.prompt, bos=True)
        groups[len(ids)].append((i, ids))
    max_answer = max(len(encode_text(tokenizer, p.answer)) for p in problems)
    per_depth = {}
    for depth in depths:
        correct = [False] * len(problems)
        for _, items in sorted(groups.items()):
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                results = generate_batch(
                    model, tokenizer, [ids for _, ids in chunk], num_steps=depth, max_new_tokens=max_answer + 1,
                    temperature=0.0, seed=seed + start, init_scale=init_scale, stop_ids=stop_ids,
                )  # fmt: skip
                for (i, _), r in zip(chunk, results):
                    correct[i] = r.stopped and r.text == problems[i].answer
        by_difficulty = defaultdict(list)
        for p, c in zip(problems, correct):
            by_difficulty[p.difficulty].append(c)
        per_depth[depth] = {
            "accuracy": sum(correct) / len(problems),
            "by_difficulty": {d: sum(v) / len(v) for d, v in sorted(by_difficulty.items())},
        }
    return per_depth


def evaluate(
    run: str | Path | None = None,
    step: int | None = None,
    export: str | Path | None = None,
    dataset: str | Path | None = None,
    depths: list[int] | None = None,
    num_problems: int = 256,
    harder: tuple[int, int] | None = None,
    seed: int = 12345,
    out: str | Path | None = None,
    batch_size: int = 64,
    init_scale: float | None = None,
    plot: bool = True,
) -> dict:
    """Accuracy against test-time depth on in-distribution and harder problems; writes `<out>/reasoning.json`
    and `<out>/reasoning_accuracy.png` (out defaults to `<run>/reasoning` or `<export>/reasoning`)."""
    from raven_titan.eval.generate import load_model

    model, tok = load_model(run=run, step=step, export=export)
    if dataset is None:
        if run is None:
            raise RavenError(
                "with --export, pass --data (the prepared folder, for the task and its difficulty)"
            )
        cfg = json.loads((Path(run) / "config.json").read_text())
        dataset = (cfg.get("data") or {}).get("dataset", "")
    spec = read_spec(dataset)
    task, lo_hi, chains = spec["task"], tuple(spec["difficulty"]), int(spec.get("chains", 3))
    mean = model.args.mean_recurrence
    depths = sorted(set(depths)) if depths else default_depths(mean)
    if min(depths) < 1:
        raise RavenError(f"--depths {depths}: every depth must be >= 1")
    if harder is None:
        harder = (lo_hi[1] + 1, 2 * lo_hi[1])
    sets = {  # harder chase problems: a longer question chain among distractors of the training range
        "in_distribution": (lo_hi, make_problems(task, num_problems, lo_hi, seed, chains, True)),
        "harder": (harder, make_problems(task, num_problems, harder, seed + 1, chains, True, lo_hi)),
    }
    results = {
        "source": str(run or export), "step": model.loaded_step, "task": task, "chains": chains,
        "train_difficulty": list(lo_hi), "train_mean_recurrence": mean, "depths": depths,
        "num_problems": num_problems, "seed": seed, "sets": {},
    }  # fmt: skip
    for name, (rng_diff, problems) in sets.items():
        start = time.perf_counter()
        per_depth = accuracy_by_depth(model, tok, problems, depths, seed, batch_size, init_scale)
        results["sets"][name] = {
            "difficulty": list(rng_diff),
            "example": problems[-1].text,
            "accuracy": {str(d): v["accuracy"] for d, v in per_depth.items()},
            "by_difficulty": {str(d): {str(k): a for k, a in v["by_difficulty"].items()} for d, v in per_depth.items()},
            "seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip
    out = Path(out) if out is not None else Path(run or export) / "reasoning"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reasoning.json").write_text(json.dumps(results, indent=1) + "\n")
    results["json"] = str(out / "reasoning.json")
    if plot:
        results["plot"] = str(plot_results(results, out / "reasoning_accuracy.png"))
    return results


def format_table(results: dict) -> str:
    depths = results["depths"]
    lines = [f"exact-match accuracy by test-time depth (training mean {results['train_mean_recurrence']})"]
    lines.append(f"  {'depth':<26}" + "".join(f"{d:>7}" for d in depths))
    for name, s in results["sets"].items():
        label = f"{name} ({s['difficulty'][0]}-{s['difficulty'][1]})"
        lines.append(f"  {label:<26}" + "".join(f"{s['accuracy'][str(d)]:>7.3f}" for d in depths))
        diffs = s["by_difficulty"][str(depths[0])].keys()
        for k in diffs:
            row = "".join(f"{s['by_difficulty'][str(d)][k]:>7.3f}" for d in depths)
            lines.append(f"    {'difficulty ' + k:<24}" + row)
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> Path:
    """Accuracy vs depth (log2 axis): both sets, and one curve per difficulty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = results["depths"]
    mean = results["train_mean_recurrence"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for name, s in results["sets"].items():
        label = f"{name.replace('_', '-')} ({s['difficulty'][0]}-{s['difficulty'][1]})"
        ax.plot(depths, [s["accuracy"][str(d)] for d in depths], marker="o", label=label)
    ax2 = axes[1]
    cmap = plt.get_cmap("viridis")
    diffs = [(name, k) for name, s in results["sets"].items() for k in s["by_difficulty"][str(depths[0])]]
    for i, (name, k) in enumerate(diffs):
        s = results["sets"][name]
        ax2.plot(
            depths, [s["by_difficulty"][str(d)][k] for d in depths], marker=".",
            color=cmap(i / max(len(diffs) - 1, 1)), label=f"difficulty {k}",
        )  # fmt: skip
    unit = "hops" if results["task"] == "chase" else "digits"
    for a, title in ((ax, "overall"), (ax2, f"by difficulty ({unit})")):
        a.axvline(mean, color="gray", ls="--", lw=1, label=f"training mean {mean}")
        a.set_xscale("log", base=2)
        a.set_xticks(depths, [str(d) for d in depths])
        a.set_ylim(-0.02, 1.02)
        a.set_xlabel("test-time depth (core iterations)")
        a.set_ylabel("exact-match accuracy")
        a.set_title(f"{results['task']}: {title}")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"{results['source']} (step {results['step']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- command line -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raven_titan.eval.reasoning",
        description="Built-in reasoning task (pointer chasing or addition): prepare training data, or "
        "evaluate exact-match accuracy against test-time depth.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="write <out>/tokenizer and <out>/data (a prepared dataset folder)")
    pp.add_argument("--out", type=Path, required=True)
    pp.add_argument("--task", choices=TASKS, default="chase")
    pp.add_argument(
        "--difficulty", type=int, nargs=2, default=(1, 4), metavar=("LO", "HI"), help="hops or digits"
    )
    pp.add_argument(
        "--chains", type=int, default=3, help="chase: chains per problem (1 target + distractors)"
    )
    pp.add_argument("--queries", type=int, default=8, help="chase: questions per training document")
    pp.add_argument("--num-train", type=int, default=200_000, help="problems (documents) to write")
    pp.add_argument("--seq-len", type=int, default=128, help="must equal training.seq_len")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument(
        "--tokenizer", default=BYTES_TOKENIZER,
        help="'bytes' (default: write a byte-level tokenizer to <out>/tokenizer) or an existing tokenizer folder",
    )  # fmt: skip
    pe = sub.add_parser("evaluate", help="accuracy vs test-time depth, JSON + PNG")
    src = pe.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="training run folder")
    src.add_argument("--export", type=Path, help="Hugging Face export folder (needs --data)")
    pe.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    pe.add_argument(
        "--data", type=Path, default=None, help="prepared dataset (default: the run's data.dataset)"
    )
    pe.add_argument("--depths", type=int, nargs="+", default=None, help="default: 1 .. 4x the training mean")
    pe.add_argument("--num-problems", type=int, default=256, help="per set (equal shares per difficulty)")
    pe.add_argument(
        "--harder", type=int, nargs=2, default=None, metavar=("LO", "HI"), help="default: HI+1 .. 2*HI"
    )
    pe.add_argument("--seed", type=int, default=12345, help="evaluation problems and initial states")
    pe.add_argument("--batch-size", type=int, default=64)
    pe.add_argument(
        "--init-scale", type=float, default=None, help="initial-state noise (default: the model's)"
    )
    pe.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/reasoning)")
    pe.add_argument("--no-plot", dest="plot", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        if ns.command == "prepare":
            start = time.perf_counter()
            folder = prepare(
                ns.out,
                ns.task,
                tuple(ns.difficulty),
                ns.num_train,
                ns.seq_len,
                ns.seed,
                ns.chains,
                ns.tokenizer,
                queries=ns.queries,
            )
            manifest = json.loads((folder / "dataset.json").read_text())
            tok_dir = ns.out / "tokenizer" if ns.tokenizer == BYTES_TOKENIZER else ns.tokenizer
            print(
                f"prepared {folder} ({manifest['rows']['train']} train / {manifest['rows']['val']} val rows of "
                f"{manifest['row_len']} tokens; tokenizer {tok_dir}) in {time.perf_counter() - start:.1f} s\n"
                f"example: {manifest['reasoning']['example']}\n"
                f'train with: data.dataset = "{folder}", data.tokenizer = "{tok_dir}", training.seq_len = {ns.seq_len}'
            )
        else:
            results = evaluate(
                ns.run, ns.step, ns.export, ns.data, ns.depths, ns.num_problems,
                tuple(ns.harder) if ns.harder else None, ns.seed, ns.out, ns.batch_size, ns.init_scale, ns.plot,
            )  # fmt: skip
            print(format_table(results))
            print(f"results: {results['json']}" + (f"\nplot: {results['plot']}" if "plot" in results else ""))

    return run_command(body)


__all__ = [
    "Problem",
    "accuracy_by_depth",
    "addition_problem",
    "chase_problem",
    "evaluate",
    "make_problems",
    "prepare",
    "solve",
]


if __name__ == "__main__":
    sys.exit(main())
