"""scripts/evaluate_synthetic.py and its measures: downstream utility, MAUVE, memorisation scan."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, brute_force_longest_span, cli_flags, local_sentences, process_env, run_ok, write_records
from transformers import AutoModelForCausalLM, AutoTokenizer

from scripts import evaluate_synthetic
from utils.cli import UserInputError
from utils.synthetic.downstream import DownstreamConfig, Vocabulary, evaluate, pack, train
from utils.synthetic.fidelity import distinct_n, hidden_state_features, mauve_scores
from utils.synthetic.memorisation import HashedRecords, Hasher, locate, longest_shared_spans

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = process_env(CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def sentences():
    return local_sentences(400)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def token_lists(tokenizer, texts, cut=32):
    return [ids[:cut] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# ---- memorisation ----------------------------------------------------------------------------


def scan(queries, records, vocab_size, seed=0):
    hasher = Hasher(vocab_size, seed=seed)
    corpus = HashedRecords(records, hasher)
    return (*longest_shared_spans(queries, corpus, hasher), corpus)


def test_longest_span_equals_brute_force_on_small_cases():
    rng = np.random.default_rng(0)
    for trial in range(150):
        vocab = int(rng.integers(2, 6))  # small alphabets: many partial matches, spans across records
        records = [
            rng.integers(0, vocab, size=int(rng.integers(0, 14))).tolist() for _ in range(int(rng.integers(1, 5)))
        ]
        queries = [rng.integers(0, vocab, size=int(rng.integers(0, 12))).tolist() for _ in range(5)]
        lengths, where, corpus = scan(queries, records, vocab, seed=trial)
        for query, length, start in zip(queries, lengths, where):
            assert length == brute_force_longest_span(query, records), (query, records)
            if length:
                assert locate(query[start : start + length], corpus) is not None


def test_spans_do_not_run_across_two_training_records():
    lengths, _, _ = scan([[1, 2, 3, 4]], [[0, 1, 2], [3, 4, 0]], 5)
    assert lengths.tolist() == [2]


def test_planted_20_token_copy_is_found_and_text_sharing_nothing_scores_zero():
    rng = np.random.default_rng(1)
    records = [rng.integers(0, 500, size=120).tolist() for _ in range(300)]
    fresh = lambda n: rng.integers(500, 1000, size=n).tolist()  # noqa: E731 (tokens no record holds)
    copy = records[123][40:60]
    queries = [fresh(30) + copy + fresh(14), fresh(64), []]
    lengths, where, corpus = scan(queries, records, 1000)
    assert lengths.tolist() == [20, 0, 0]
    assert where[0] == 30 and locate(copy, corpus) == (123, 40)


# ---- fidelity ---------------------------------------------------------------------------------


def test_features_are_each_records_last_hidden_state_whatever_the_batching(tiny_llama, tokenizer, sentences):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    records = token_lists(tokenizer, sentences[:9]) + [[]]
    batched = hidden_state_features(model, records, 0, batch_size=4)
    with torch.no_grad():
        alone = [
            model(input_ids=torch.tensor([[0] + r]), output_hidden_states=True).hidden_states[-1][0, -1]
            for r in records
        ]
    np.testing.assert_allclose(batched, torch.stack(alone).numpy(), atol=1e-5)


def test_mauve_is_one_for_a_set_against_itself_and_near_zero_against_random_points():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(200, 16))
    random = rng.normal(size=(200, 16)) + 6.0  # the features of text from another distribution
    assert mauve_scores(text, text, [0, 1]) == pytest.approx([1.0, 1.0])
    assert max(mauve_scores(random, text, [0, 1])) < 0.05


def test_distinct_n_counts_repeated_n_grams():
    assert distinct_n([[1, 2, 1, 2], [1, 2]], 2) == pytest.approx(2 / 4)
    assert distinct_n([[5]], 2) == 0.0


# ---- downstream utility -----------------------------------------------------------------------


def test_downstream_trainer_learns_real_text_better_than_random_text(tokenizer, sentences):
    real, test = token_lists(tokenizer, sentences[:200]), token_lists(tokenizer, sentences[300:360])
    rng = np.random.default_rng(0)
    random = [rng.integers(0, len(tokenizer), size=len(r)).tolist() for r in real]
    vocab = Vocabulary(real + random + test)
    sizes = dict(hidden_size=32, intermediate_size=64, heads=2, block_size=33, batch_size=8)
    config = DownstreamConfig(**sizes, train_tokens=60 * 8 * 33, learning_rate=1e-2)
    scores = {}
    for name, records in (("real", real), ("random", random)):
        model, steps = train(pack(records, vocab, config.block_size), len(vocab), config, seed=0)
        scores[name] = evaluate(model, test, vocab)
    assert steps == 60
    assert scores["real"]["accuracy"] > scores["random"]["accuracy"] + 0.02
    assert scores["real"]["perplexity"] < 0.5 * scores["random"]["perplexity"]


def test_downstream_training_is_reproducible_for_a_seed(tokenizer, sentences):
    records = token_lists(tokenizer, sentences[:40])
    vocab = Vocabulary(records)
    config = DownstreamConfig(
        hidden_size=16, intermediate_size=32, heads=2, block_size=17, batch_size=4, train_tokens=5 * 4 * 17
    )
    runs = [
        evaluate(train(pack(records, vocab, 17), len(vocab), config, seed)[0], records[:8], vocab) for seed in (3, 3, 4)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


# ---- the script -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluation(tiny_llama, sentences, tmp_path_factory):
    """One run of the script: a set holding copies of training records, and held-out sentences."""
    root = tmp_path_factory.mktemp("evaluate")
    train_file = write_records(root / "train.jsonl", [("Abstract:", s) for s in sentences[:200]], jsonl=True)
    test_file = write_records(root / "test.jsonl", [("Abstract:", s) for s in sentences[200:240]], jsonl=True)
    planted = max(sentences[:200], key=len)  # a whole training record at the start of new text
    copies = [("Abstract:", f"{planted} {s}" if i < 5 else s) for i, s in enumerate(sentences[260:300])]
    sets = {
        "copies": write_records(root / "copies.jsonl", copies, jsonl=True),
        "test": test_file,
    }  # the test records themselves: MAUVE must be 1
    out = root / "report"
    synthetic = [f"--synthetic={k}={v}" for k, v in sets.items()]
    data = cli_flags(model_name_or_path=tiny_llama, train_file=train_file, test_file=test_file, test_records=40)
    settings = cli_flags(num_records=40, max_tokens=32, seeds=2, threads=1, output_dir=out)
    result = run_ok([sys.executable, "-m", "scripts.evaluate_synthetic", *synthetic, *data, *settings], ENV)
    return {
        "out": out,
        "stdout": result.stdout,
        "planted": planted,
        "sentences": sentences[:200],
        "report": json.loads((out / "synthetic_report.json").read_text()),
        "tokenizer_dir": tiny_llama,
    }


def test_report_measures_every_set_and_the_real_reference(evaluation):
    report = evaluation["report"]
    assert list(report["sets"]) == ["copies", "test", "real"]
    for entry in report["sets"].values():
        assert {"utility", "fidelity", "memorisation"} <= set(entry)
        assert len(entry["utility"]["accuracy"]["values"]) == 2
    assert report["sets"]["real"]["utility"]["relative_performance"]["mean"] == pytest.approx(1.0)
    assert report["sets"]["test"]["fidelity"]["mauve"]["mean"] == pytest.approx(1.0)
    assert 0 <= report["sets"]["copies"]["fidelity"]["mauve"]["mean"] <= 1
    assert report["releases_non_private_statistics"] is True
    assert (evaluation["out"] / "synthetic_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (evaluation["out"] / "synthetic_report.txt").read_text()
    assert table.splitlines()[0].split()[:2] == ["set", "records"] and table.strip() in evaluation["stdout"]


def test_planted_copies_are_counted_and_shown_on_the_console_only(evaluation, tokenizer):
    memo = evaluation["report"]["sets"]["copies"]["memorisation"]
    planted_tokens = len(tokenizer(evaluation["planted"], add_special_tokens=False)["input_ids"])
    assert planted_tokens >= 20 and memo["max"] == min(planted_tokens, 32)  # texts are cut to 32 tokens
    assert memo["share_at_least_16"] >= 5 / 40
    assert sum(memo["histogram"]) == 40
    assert "longest spans shared with a training record" in evaluation["stdout"]
    written = "".join(p.read_text(errors="ignore") for p in evaluation["out"].iterdir())
    # the report is a release: no training text in it, not even the copied sentence
    assert not [s for s in evaluation["sentences"] if s in written]


def test_bad_input_is_one_line_and_exit_status_2(tiny_llama, tmp_path):
    missing = tmp_path / "missing.jsonl"
    args = cli_flags(synthetic=f"dp={missing}", model_name_or_path=tiny_llama, output_dir=tmp_path / "out")
    cmd = [sys.executable, "-m", "scripts.evaluate_synthetic", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing.jsonl'}: file not found"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no records (the file is empty)"),
        (
            '{"instruction": "Abstract:", "answer": "a"}\n{"instruction": "Abstract:"}\n',
            "record 1 (counting from 0): 'answer' is missing or null",
        ),
        ('{"instruction": "Abstract:", "text": "a"}\n', "records lack the key(s) ['answer']"),
        ('{"instruction": "Abstract:", "answer": "  "}\n', "every answer is empty"),
    ],
)
def test_bad_synthetic_files_are_refused_naming_the_file(tiny_llama, tmp_path, content, message):
    path = tmp_path / "set.jsonl"
    path.write_text(content)
    args = evaluate_synthetic.parse_args(
        ["--synthetic", f"dp={path}", "--model_name_or_path", tiny_llama, "--output_dir", str(tmp_path / "out")]
    )
    with pytest.raises(UserInputError) as err:
        evaluate_synthetic.evaluate(args, log=lambda *_: None)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--synthetic", "no-label.jsonl"], "expected LABEL=FILE"),
        (["--synthetic", "real=a.jsonl"], "the label 'real' names the real-data reference"),
        (["--synthetic", "a=x.jsonl", "--synthetic", "a=y.jsonl"], "the label 'a' is given twice"),
        (["--synthetic", "a=x.jsonl", "--measures", "utility,speed"], "--measures utility,speed: choose among"),
        (["--synthetic", "a=x.jsonl", "--seeds", "0"], "--seeds 0: must be at least 1"),
    ],
)
def test_bad_arguments_are_refused(argv, message):
    with pytest.raises(UserInputError, match=message):
        evaluate_synthetic.parse_args(argv + ["--output_dir", "unused"])


def test_more_records_asked_than_a_set_holds_is_refused(evaluation, tmp_path):
    path = write_records(tmp_path / "few.jsonl", [("Abstract:", "one record")], jsonl=True)
    model = evaluation["tokenizer_dir"]
    argv = cli_flags(synthetic=f"few={path}", num_records=5, model_name_or_path=model, output_dir=tmp_path / "out")
    args = evaluate_synthetic.parse_args(argv)
    with pytest.raises(UserInputError, match="1 records, fewer than --num_records 5"):
        evaluate_synthetic.evaluate(args, log=lambda *_: None)


# ---- the demo's --evaluate --------------------------------------------------------------------


@pytest.mark.slow
def test_demo_evaluate_generates_a_set_per_model_and_measures_them(tiny_llama, sentences, tmp_path):
    import datasets

    splits = {"train": sentences[:64], "validation": sentences[64:72], "test": sentences[72:112]}
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"text": texts, "pmid": [str(i) for i in range(len(texts))]})
            for split, texts in splits.items()
        }
    ).save_to_disk(str(tmp_path / "pubmed"))
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--model_name_or_path", tiny_llama,
         "--dataset_dir", str(tmp_path / "pubmed"), "--output_dir", str(out), "--val_records", "8", "--steps", "2",
         "--batch_size", "8", "--micro_batch_size", "4", "--block_size", "24", "--num_samples", "2",
         "--max_new_tokens", "8", "--evaluate", "--eval_records", "12", "--eval_batch_size", "6",
         "--eval_seeds", "1"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "$ python -m scripts.evaluate_synthetic --synthetic=base=" in result.stdout
    for label in ("base", "dp", "nonprivate"):
        rows = (out / "synthetic" / label / "generations.jsonl").read_text().splitlines()
        assert len(rows) == 12
    report = json.loads((out / "evaluation" / "synthetic_report.json").read_text())
    assert list(report["sets"]) == ["base", "dp", "nonprivate", "real"]
    assert report["settings"]["max_tokens"] == 24 and report["settings"]["test_records"] == 40
    assert report["settings"]["training_corpus"]["records"] == 64  # the adapters' whole training set
    summary = json.loads((out / "summary.json").read_text())
    assert summary["perplexity_nonprivate"] is not None  # --evaluate trains the non-private adapter
    # the non-private reference trains at its own setting, the DP run at the recipe's
    commands = [line for line in result.stdout.splitlines() if line.startswith("$ python train_clm.py")]
    nonprivate = next(c for c in commands if "/nonprivate " in c)
    dp = next(c for c in commands if "/dp " in c)
    assert "--learning_rate 0.01 " in nonprivate and "--adam_beta1 0.9 " in nonprivate
    assert "--learning_rate 0.03 " in dp and "--adam_beta1 0.0 " in dp
    assert summary["nonprivate_learning_rate"] == 0.01 and summary["nonprivate_adam_beta1"] == 0.9


@pytest.mark.parametrize("measures", [["fidelity"], ["memorisation"], ["utility", "fidelity", "memorisation"]])
def test_every_measure_flags_the_report_as_holding_training_statistics(measures):
    """The 'real' row of fidelity (MAUVE, lengths, distinct-n) comes from training records too."""
    flag, note = evaluate_synthetic.privacy_note(measures)
    assert flag is True and all(m in note for m in measures) and "training records" in note
