"""The README demo (scripts/demo.py) end to end on a tiny model and a tiny PubMed-like data set."""

import json
import sys

import datasets
import pytest
from helpers import cli_flags, local_sentences, process_env, run_ok


def pubmed_like(texts, authors):
    """The columns of the built PubMed data set."""
    return datasets.Dataset.from_dict(
        {
            "text": texts,
            "pmid": [str(i) for i in range(len(texts))],
            "pub_date": ["2020-01-01"] * len(texts),
            "author": authors,
        }
    )


def run_demo(model, folder, **options):
    """scripts/demo.py on a PubMed-like data set of 64 training and 8 validation sentences; returns
    its completed process (stdout holds the stage commands)."""
    sentences = local_sentences(80)
    # 20 first authors write the 64 training abstracts; of 16 validation abstracts, 8 are by one of them
    train_authors = [f"Author{i % 20} A" for i in range(64)]
    val_authors = [f"Author{i} A" if i % 2 else f"Reviewer{i} B" for i in range(16)]
    dataset = datasets.DatasetDict(
        {
            "train": pubmed_like(sentences[:64], train_authors),
            "validation": pubmed_like(sentences[64:80], val_authors),
        }
    )
    dataset.save_to_disk(str(folder / "pubmed"))
    small = dict(val_records=8, steps=2, batch_size=8, micro_batch_size=4, block_size=32)
    flags = cli_flags(model_name_or_path=model, dataset_dir=folder / "pubmed", output_dir=folder / "demo", **small)
    command = [sys.executable, "-m", "scripts.demo", *flags, *cli_flags(**options)]
    return run_ok(command, process_env(1, CUDA_VISIBLE_DEVICES=""), timeout=600)


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_summary_and_plot(tiny_llama, tmp_path):
    result = run_demo(tiny_llama, tmp_path, num_samples=2, max_new_tokens=8)
    out = tmp_path / "demo"

    # each stage's real command is shown before it runs
    for script in ("train_clm.py", "inference_generation_dataset.py"):
        assert f"$ python {script} " in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["num_units"] == 64  # the whole train split by default
    assert 0 < summary["epsilon"] <= 8 + 1e-6 and summary["delta"] == pytest.approx(1e-5)
    assert summary["sampling_rate"] == pytest.approx(8 / 64)
    assert summary["perplexity_base"] > 1 and summary["perplexity_dp"] > 1
    assert len(summary["samples"]) == 2
    # the recipe of the sweep reaches the training run: AdamW without momentum
    assert summary["adam_beta1"] == 0.0 and "--adam_beta1 0.0" in result.stdout
    # the release: the DP run's log holds only its private loss estimate, public settings and epsilon
    released = {"step", "train_loss", "lr", "epsilon"}
    assert all(set(row) <= released for row in json.loads((out / "dp" / "training_log.json").read_text()))
    assert summary["loss_noise_multiplier"] > 0 and summary["effective_noise_multiplier"] < summary["noise_multiplier"]
    text = (out / "summary.txt").read_text()
    assert "epsilon" in text and "perplexity" in text and text.strip() in result.stdout
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the subsets are JSON Lines instruction/answer records with the seed's prompt
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and {r["instruction"] for r in rows} == {"Abstract:"}


@pytest.mark.slow
def test_demo_trains_at_author_level(tiny_llama, tmp_path):
    """--privacy_unit author: the first author (20 of them for 64 abstracts) is what epsilon protects."""
    result = run_demo(tiny_llama, tmp_path, privacy_unit="author", num_samples=1, max_new_tokens=4)
    out = tmp_path / "demo"
    assert "--privacy_unit_key author" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    report = json.loads((out / "dp" / "privacy_report.json").read_text())
    assert summary["privacy_unit"] == "author" and summary["num_units"] == report["num_units"] == 20
    assert report["privacy_unit"] == "author" and report["sampling_rate"] == pytest.approx(8 / 20)
    assert summary["delta"] == pytest.approx(min(1e-5, 1 / 200))  # at most 1 / (10 x units)
    # it publishes how many authors, never how many abstracts; its validation shares no author
    text = (out / "summary.txt").read_text()
    assert "train_records" not in summary and "64 training" not in text and "per unit" not in text
    validation = [json.loads(line) for line in (out / "data" / "validation.jsonl").read_text().splitlines()]
    assert len(validation) == 8 and all(r["author"].startswith("Reviewer") for r in validation)
    assert summary["ledger_epsilon"] == pytest.approx(summary["epsilon"], rel=1e-9)


def test_every_recipe_sweep_setting_changes_options_the_demo_has():
    # a misspelt option would ride along in the namespace unused, and the sweep would measure the
    # demo's default under another name
    from scripts.demo import parse_args
    from scripts.recipe_sweep import SETTINGS, SWEPT_AROUND

    options = vars(parse_args([]))
    for name, setting in {**SETTINGS, "swept around": SWEPT_AROUND}.items():
        assert set(setting) <= set(options), name
