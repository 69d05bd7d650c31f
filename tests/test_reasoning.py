"""The built-in reasoning task: generators checked by an independent solver, data preparation, evaluation."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from raven_titan.errors import RavenError
from raven_titan.eval import reasoning
from raven_titan.eval.generate import GenerationResult
from raven_titan.eval.reasoning import (
    addition_problem,
    chase_problem,
    default_depths,
    make_problems,
    prepare,
    solve,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two that wait for each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("hops", range(1, 9))
def test_chase_answers_match_an_independent_solver(hops):
    rng = random.Random(hops)
    for _ in range(200):
        p = chase_problem(rng, hops, chains=3, chain_range=(1, 8), queries=3)
        assert solve(p.prompt) == (p.answer, hops)  # the solver follows the pointers itself
        assert _check_document(p.text) == 3 and p.text.startswith(p.prompt + p.answer + ";")
        names = re.findall(r"([a-z])=", p.prompt)
        assert len(names) == len(set(names))  # every variable is assigned once
        roots = re.findall(r"=(\d)", p.prompt)
        assert len(roots) == 3 == len(set(roots))  # one distinct digit per chain
        assert p.prompt.endswith("?")


def test_chase_hand_example_and_solver_rejects_malformed():
    assert solve("f=3;q=7;k=f;z=k;c=q;z?") == ("3", 3)
    assert solve("f=3;q=7;k=f;z=k;c=q;c?") == ("7", 2)
    with pytest.raises(ValueError, match="before it is assigned"):
        solve("k=f;f=3;k?")
    with pytest.raises(ValueError):
        solve("hello")


@pytest.mark.parametrize("digits", range(1, 9))
def test_addition_answers_match_python_integers(digits):
    rng = random.Random(digits)
    for _ in range(300):
        p = addition_problem(rng, digits)
        a, b = map(int, p.prompt[:-1].split("+"))
        assert p.answer == str(a + b) and len(str(a)) == digits and 1 <= len(str(b)) <= digits
        assert solve(p.prompt) == (p.answer, digits)


def test_difficulty_knobs():
    problems = make_problems("chase", 400, (2, 5), seed=0)
    assert {p.difficulty for p in problems} == {2, 3, 4, 5}
    for p in problems:  # every chain's length is in the range (counted from the roots)
        assert all(2 <= n <= 5 for n in _chain_lengths(p.prompt))
    balanced = make_problems("chase", 40, (5, 8), seed=1, balanced=True, chain_range=(1, 4))
    assert [p.difficulty for p in balanced[:4]] == [5, 6, 7, 8]
    for p in balanced:
        lengths = sorted(_chain_lengths(p.prompt))
        assert lengths[-1] == p.difficulty and all(n <= 4 for n in lengths[:-1])
    assert make_problems("chase", 5, (1, 4), seed=3) == make_problems("chase", 5, (1, 4), seed=3)
    with pytest.raises(RavenError, match="letters"):
        make_problems("chase", 1, (9, 9), seed=0, chains=3)
    with pytest.raises(RavenError, match="unknown task"):
        make_problems("sort", 1, (1, 2), seed=0)
    assert default_depths(4) == [1, 2, 3, 4, 6, 8, 12, 16]


def _check_document(doc: str) -> int:
    """Every question of a training document ("stmts;x?d;y?e") is answered correctly; returns their number."""
    items = doc.split(";")
    statements = ";".join(i for i in items if "=" in i)
    questions = [i.split("?") for i in items if "?" in i]
    for var, answer in questions:
        assert solve(f"{statements};{var}?")[0] == answer
    return len(questions)


def _chain_lengths(prompt: str) -> list[int]:
    binding = dict(re.findall(r"([a-z])=([a-z0-9])", prompt))
    used = set(binding.values())
    lengths = []
    for end in (v for v in binding if v not in used):
        n, x = 0, end
        while x.isalpha():
            x, n = binding[x], n + 1
        lengths.append(n)
    return lengths


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("reasoning")
    folder = prepare(out, "chase", (1, 3), num_train=600, seq_len=96, seed=0)
    return out, folder


def test_prepared_folder_trains_through_the_normal_dataset_path(prepared):
    from raven_titan.config.job_config import Data
    from raven_titan.data.default_corpus import resolve_dataset
    from raven_titan.data.shards import PackedRows
    from raven_titan.data.tokenizer import load_tokenizer

    out, folder = prepared
    info = load_tokenizer(out / "tokenizer")
    assert info.vocab_size == 288
    assert resolve_dataset(Data(dataset=str(folder), cache_dir=str(out)), 96, info) == folder
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["reasoning"]["task"] == "chase" and manifest["packing"] == "drop"
    rows = PackedRows(folder / "train")
    checked = 0
    for r in range(min(len(rows), 20)):
        row = np.asarray(rows[r]).tolist()
        assert row[0] == info.bos_id  # "drop" packing: every row starts at a problem
        stream = info.tokenizer.decode(row, skip_special_tokens=False)
        for doc in re.findall(r"<\|begin_text\|>(.*?)<\|end_text\|>", stream):
            variables = doc.count("=")
            assert _check_document(doc) == min(8, variables)  # 8 questions (the default) if there are 8
            checked += 1
    assert checked >= 20  # at least one complete problem per row
    with pytest.raises(RavenError, match="already exists"):
        prepare(out, "chase", (1, 3), num_train=10, seq_len=96)


def test_accuracy_plumbing_with_an_oracle(prepared, monkeypatch):
    """Grouping by prompt length, exact match and per-difficulty accounting, with a fake model that answers
    correctly only at depth >= the number of hops."""
    from raven_titan.data.tokenizer import load_tokenizer

    out, _ = prepared
    tok = load_tokenizer(out / "tokenizer")

    def oracle(model, tokenizer, prompts, *, num_steps, **kw):
        results = []
        for ids in prompts:
            text = tokenizer.tokenizer.decode(ids[1:])
            answer, hops = solve(text)
            guess = answer if num_steps >= hops else "x"
            results.append(GenerationResult([0, tokenizer.eos_id], guess, [num_steps] * 2, stopped=True))
        return results

    monkeypatch.setattr("raven_titan.eval.generate.generate_batch", oracle)
    problems = make_problems("chase", 40, (1, 4), seed=5, balanced=True)
    acc = reasoning.accuracy_by_depth(None, tok, problems, [1, 2, 4], batch_size=3)
    assert acc[1]["accuracy"] == 0.25 and acc[2]["accuracy"] == 0.5 and acc[4]["accuracy"] == 1.0
    assert acc[2]["by_difficulty"] == {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0}


def test_evaluate_end_to_end_on_an_export(prepared, tmp_path, capsys):
    from raven_titan.hf.export import export_hf
    from raven_titan.models.raven.args import RavenArgs
    from raven_titan.models.raven.model import RavenForCausalLM

    out, folder = prepared
    args = RavenArgs(
        n_embd=32, n_heads=4, intermediate_size=48, vocab_size=288, padding_multiple=64, block_size=128,
        n_layers_in_prelude=1, n_layers_in_recurrent_block=1, n_layers_in_coda=1, mean_recurrence=2,
        mean_backprop_depth=1,
    )  # fmt: skip
    model = RavenForCausalLM(args)
    model.init_weights(0)
    export_hf(model, args, tmp_path / "exp", out / "tokenizer", torch.float32)
    argv = ["evaluate", "--export", str(tmp_path / "exp"), "--data", str(folder), "--num-problems", "6"]
    assert reasoning.main([*argv, "--depths", "1", "3", "--out", str(tmp_path / "res")]) == 0
    printed = capsys.readouterr().out
    assert "in_distribution (1-3)" in printed and "harder (4-6)" in printed
    results = json.loads((tmp_path / "res" / "reasoning.json").read_text())
    assert results["depths"] == [1, 3] and results["train_mean_recurrence"] == 2
    for s in results["sets"].values():
        assert set(s["accuracy"]) == {"1", "3"} and all(0 <= a <= 1 for a in s["accuracy"].values())
    assert (tmp_path / "res" / "reasoning_accuracy.png").stat().st_size > 1000
    assert reasoning.main(["evaluate", "--export", str(tmp_path / "exp")]) == 2
    assert "pass --data" in capsys.readouterr().err
