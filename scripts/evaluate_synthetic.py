"""Measure synthetic text: downstream utility, fidelity to real text, memorisation of training records.

    python -m scripts.evaluate_synthetic --synthetic base=outputs/demo/synthetic/base/generations.jsonl \
        --synthetic dp=outputs/demo/synthetic/dp/generations.jsonl \
        --synthetic nonprivate=outputs/demo/synthetic/nonprivate/generations.jsonl \
        --output_dir outputs/demo/evaluation

For each labelled synthetic set (generations.jsonl of the inference scripts, its answers) and for
the same number of real training records ("real"):

1. utility (Yu et al. 2023): a small causal LM (2.3M parameters on PubMed) trained from scratch on the set
   with fixed hyperparameters and the same token budget, three seeds; next-token accuracy and
   perplexity on real test records, and relative performance (accuracy over the real-data model's);
2. fidelity: MAUVE against the real test records on the base model's last hidden states (spread
   over k-means seeds), token lengths and distinct-n;
3. memorisation: per record, the longest token span found verbatim in any training record (the
   whole training set); the share of records at 8, 16 and 32 tokens or more. The "real" row gives
   the same figures for held-out test records: what unseen real text shares by chance.

Every text is cut to its first --max_tokens tokens (the training records searched for copies are
not). Outputs in --output_dir: synthetic_report.json, synthetic_report.txt (the table) and
synthetic_report.png. The training text that a synthetic record copies is printed on the console
only (the data curator's), never written to the report; but the report's real-data model and
memorisation figures are exact statistics of the training data, not covered by epsilon: the report
says so in "releases_non_private_statistics".
"""

import argparse
import os
import random
import time

import numpy as np
import torch

from utils.cli import DefaultsHelpFormatter, UserInputError, run_cli
from utils.data_utils import DEFAULT_PUBMED_DIR, load_pubmed, load_records_file
from utils.io_utils import publish_outputs, write_json, write_text
from utils.synthetic.synthetic_report import plot_report, report_table, worst_examples

MEASURES = ("utility", "fidelity", "memorisation")
REAL = "real"
REPORT = "synthetic_report"
SETTINGS = ("num_records", "test_records", "max_tokens", "seeds", "epochs", "measures", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument(
        "--synthetic",
        action="append",
        required=True,
        metavar="LABEL=FILE",
        help="a labelled synthetic set (JSON or JSON Lines instruction/answer records); repeat",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--model_name_or_path",
        default=None,
        help="base model: its tokenizer and hidden states (default: models/SmolLM2-135M-Instruct)",
    )
    p.add_argument("--dataset_dir", default=None, help="built PubMed data set (default: data/pubmed_dataset)")
    p.add_argument("--train_file", default=None, help="the training records (default: the data set's train split)")
    p.add_argument("--test_file", default=None, help="held-out real records (default: the data set's test split)")
    p.add_argument(
        "--num_records",
        type=int,
        default=None,
        help="records per set, the first of each file (default: the smallest set's size)",
    )
    p.add_argument(
        "--test_records", type=int, default=None, help="real test records, a seeded sample (default: 512 or all)"
    )
    p.add_argument("--max_tokens", type=int, default=64, help="every text is cut to this many tokens")
    p.add_argument("--seeds", type=int, default=3, help="downstream trainings and MAUVE quantisations per set")
    p.add_argument(
        "--epochs",
        type=float,
        default=8.0,
        help="downstream training tokens: this many passes over the real records' tokens",
    )
    p.add_argument("--measures", default=",".join(MEASURES), help="comma list of " + ", ".join(MEASURES))
    p.add_argument("--worst_examples", type=int, default=3, help="longest copies per set shown on the console")
    p.add_argument("--seed", type=int, default=0, help="choice of the real records")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args(argv)
    args.sets = parse_sets(args.synthetic)
    args.measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    unknown = sorted(set(args.measures) - set(MEASURES))
    if unknown or not args.measures:
        raise UserInputError(f"--measures {','.join(args.measures)}: choose among {', '.join(MEASURES)}")
    for name in ("num_records", "test_records", "max_tokens", "seeds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserInputError(f"--{name} {value}: must be at least 1")
    if args.epochs <= 0:
        raise UserInputError(f"--epochs {args.epochs}: must be > 0")
    return args


def parse_sets(items):
    sets = {}
    for item in items:
        label, sep, path = item.partition("=")
        label = label.strip()
        if not sep or not label or not path:
            raise UserInputError(f"--synthetic {item}: expected LABEL=FILE, e.g. dp=outputs/dp/generations.jsonl")
        if label == REAL:
            raise UserInputError(
                f"--synthetic {item}: the label '{REAL}' names the real-data reference; choose another"
            )
        if label in sets:
            raise UserInputError(f"--synthetic {item}: the label '{label}' is given twice")
        sets[label] = path
    return sets


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def read_answers(path):
    """The answers of a records file, checked: one line of error for a missing, empty or bad file."""
    ds = load_records_file(path)
    answers = list(ds["answer"])
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            what = "missing or null" if answer is None else f"of type {type(answer).__name__}, not text"
            raise UserInputError(f"{path}: record {i} (counting from 0): 'answer' is {what}")
    if not any(a.strip() for a in answers):
        raise UserInputError(f"{path}: every answer is empty")
    return answers


def real_texts(args):
    """(training texts, test texts): the files given, else the built PubMed splits."""
    splits = None
    if args.train_file is None or args.test_file is None:
        splits = load_pubmed(args.dataset_dir)
        for split in ("train", "test"):
            if split not in splits:
                where = args.dataset_dir or DEFAULT_PUBMED_DIR
                raise UserInputError(f"{where}: the built data set has no {split} split")
    train = read_answers(args.train_file) if args.train_file else list(splits["train"]["answer"])
    test = read_answers(args.test_file) if args.test_file else list(splits["test"]["answer"])
    return train, test


def sample(texts, count, seed, what):
    if len(texts) < count:
        raise UserInputError(f"{what} has {len(texts)} records; {count} are needed")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[:count]]


def load_inputs(args):
    """Texts of every set (synthetic and real), cut to the same record count."""
    synthetic = {label: read_answers(path) for label, path in args.sets.items()}
    smallest = min(len(a) for a in synthetic.values())
    count = args.num_records or smallest
    for label, answers in synthetic.items():
        if len(answers) < count:
            raise UserInputError(
                f"--synthetic {label}={args.sets[label]}: {len(answers)} records, fewer than --num_records {count}"
            )
        synthetic[label] = answers[:count]
    train, test = real_texts(args)
    real = sample(train, count, args.seed, "the training data")
    args.test_records = args.test_records or min(512, len(test))
    test = sample(test, args.test_records, args.seed + 1, "the test data")
    return {**synthetic, REAL: real}, train, test, count


def tokenize(tokenizer, texts, cut=None):
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return [x[:cut] for x in ids] if cut else ids


# ----------------------------------------------------------------------------------------------
# The three measures
# ----------------------------------------------------------------------------------------------


def measure_memorisation(tokens, test_tokens, train_texts, tokenizer, args, log):
    from utils.synthetic.memorisation import HashedRecords, Hasher, longest_shared_spans, span_summary

    start = time.time()
    train_tokens = tokenize(tokenizer, train_texts)
    hasher = Hasher(len(tokenizer), seed=args.seed)
    corpus = HashedRecords(train_tokens, hasher)
    log(
        f"memorisation: {len(corpus):,} training records, {corpus.tokens.size:,} tokens "
        f"(tokenised and hashed in {time.time() - start:.0f} s)"
    )
    # the real row: held-out test records, which the model never saw (chance overlap)
    queries = {**{k: v for k, v in tokens.items() if k != REAL}, REAL: test_tokens}
    results = {}
    for label, records in queries.items():
        lengths, where = longest_shared_spans(records, corpus, hasher)
        results[label] = span_summary(lengths)
        if label != REAL:
            worst_examples(label, records, lengths, where, corpus, tokenizer, args.worst_examples, log)
    log(f"memorisation: {time.time() - start:.0f} s in all")
    return results, {"training_corpus": {"records": len(corpus), "tokens": int(corpus.tokens.size)}}


def measure_fidelity(tokens, test_tokens, tokenizer, args, log):
    from utils.model.model_utils import load_model
    from utils.synthetic.fidelity import distinct_n, hidden_state_features, length_stats, mauve_scores

    start = time.time()
    model = load_model(args.model_name_or_path).eval()
    begin = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    reference = hidden_state_features(model, test_tokens, begin)
    results = {}
    for label, records in tokens.items():
        features = hidden_state_features(model, records, begin)
        scores = mauve_scores(features, reference, range(args.seeds))
        results[label] = {
            "mauve": _spread(scores),
            "length_tokens": length_stats(records, args.max_tokens),
            **{f"distinct_{n}": distinct_n(records, n) for n in (1, 2, 3)},
        }
        log(f"  fidelity {label}: MAUVE {np.mean(scores):.3f}")
    test = {
        "length_tokens": length_stats(test_tokens, args.max_tokens),
        **{f"distinct_{n}": distinct_n(test_tokens, n) for n in (1, 2, 3)},
    }
    log(f"fidelity: {time.time() - start:.0f} s")
    return results, {"test_text": test}


def measure_utility(tokens, test_tokens, args, log):
    from utils.synthetic.downstream import DownstreamConfig, downstream_utility

    start = time.time()
    config = DownstreamConfig(block_size=args.max_tokens + 1)
    real_tokens = sum(len(r) + 1 for r in tokens[REAL])
    config.train_tokens = int(args.epochs * real_tokens)
    runs, vocab_size = downstream_utility(tokens, test_tokens, config, list(range(args.seeds)), progress=log)
    results = {}
    for label, run in runs.items():
        relative = [a / r for a, r in zip(run["accuracy"], runs[REAL]["accuracy"])]
        results[label] = {
            "relative_performance": _spread(relative),
            "accuracy": _spread(run["accuracy"]),
            "perplexity": _spread(run["perplexity"]),
            **{k: run[k] for k in ("steps", "packed_tokens", "epochs")},
        }
    log(f"utility: {time.time() - start:.0f} s")
    return results, {"downstream": {**config.as_dict(), "evaluation_vocabulary": vocab_size}}


def _spread(values):
    values = [float(v) for v in values]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": round(float(np.mean(values)), 4), "std": round(std, 4), "values": [round(v, 4) for v in values]}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _shown(path):
    """A path under the working directory, relative to it: the report names no machine's folders."""
    full = os.path.abspath(path)
    return os.path.relpath(full) if os.path.exists(full) and full.startswith(os.getcwd() + os.sep) else path


def privacy_note(measures):
    """(whether the report holds exact statistics of the training records, why). Every measure does:
    its 'real' row is computed on a sample of them (fidelity's MAUVE, lengths and distinct-n too),
    utility trains on them, memorisation scans them."""
    measured = ", ".join(measures)
    return True, (
        f"the 'real' row of {measured} is computed on a sample of the training records, and relative "
        "performance and the memorisation figures on them too: exact statistics of the training records, "
        "not covered by the synthetic data's epsilon; no training text is written here (the longest copies "
        "are shown on the console only)"
    )


def evaluate(args, log=print):
    from utils.model.model_utils import load_tokenizer

    if args.model_name_or_path is None:
        from scripts.prepare_model import is_complete, smollm2_dir

        args.model_name_or_path = smollm2_dir()
        if not is_complete(args.model_name_or_path):
            raise UserInputError(f"{args.model_name_or_path}: not built; run `python -m scripts.prepare_model` first")
    texts, train_texts, test_texts, count = load_inputs(args)
    tokenizer = load_tokenizer(args.model_name_or_path)
    tokens = {label: tokenize(tokenizer, t, args.max_tokens) for label, t in texts.items()}
    test_tokens = tokenize(tokenizer, test_texts, args.max_tokens)
    log(
        f"{len(tokens) - 1} synthetic sets and {count} real training records, {len(test_tokens)} test records, "
        f"{args.max_tokens} tokens max"
    )
    report = {
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "sets": {label: {"file": _shown(path)} for label, path in args.sets.items()},
        "time_s": {},
    }
    report["settings"]["model_name_or_path"] = _shown(args.model_name_or_path)
    report["settings"]["num_records"] = count
    report["sets"][REAL] = {
        "file": _shown(args.train_file or "train split"),
        "test_file": _shown(args.test_file or "test split"),
    }
    steps = {
        "memorisation": lambda: measure_memorisation(tokens, test_tokens, train_texts, tokenizer, args, log),
        "fidelity": lambda: measure_fidelity(tokens, test_tokens, tokenizer, args, log),
        "utility": lambda: measure_utility(tokens, test_tokens, args, log),
    }
    for measure in [m for m in ("memorisation", "fidelity", "utility") if m in args.measures]:
        start = time.time()
        result, about = steps[measure]()
        report["settings"].update(about)
        for label, values in result.items():
            report["sets"][label][measure] = values
        report["time_s"][measure] = round(time.time() - start, 1)
    flag, note = privacy_note(args.measures)
    report["releases_non_private_statistics"], report["privacy_note"] = flag, note
    return report


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    report = evaluate(args)
    report["time_s"]["total"] = round(time.time() - start, 1)
    table = report_table(report)

    def write(folder):
        write_json(os.path.join(folder, REPORT + ".json"), report)
        write_text(os.path.join(folder, REPORT + ".txt"), table + "\n")
        plot_report(report, os.path.join(folder, REPORT + ".png"))

    publish_outputs(args.output_dir, write)
    print("\n" + table)
    print(f"\nwrote {REPORT}.json, .txt and .png to {args.output_dir}")
    return report


if __name__ == "__main__":
    run_cli(main)
