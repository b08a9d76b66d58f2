"""Data: instruction/answer records, prompt format, label masking, collator (samplers: utils/privacy/sampling.py).

Privacy unit = one record = one sequence (docs/DESIGN.md 2.1): records are never packed together.
"""

import codecs
import hashlib
import json
import os

import datasets
import torch

from utils.cli import UserInputError

PUBMED_PROMPT = "Abstract:"
DEFAULT_PUBMED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "pubmed_dataset")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_records_file(path: str, unit_key: str | None = None) -> datasets.Dataset:
    """The seed's JSON ({"instruction": [...], "answer": [...]}) or JSON Lines records -> Dataset.

    unit_key: records also carry their privacy unit's id (a user, patient or author) under this key."""
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise UserInputError(f"{path}: no records (the file is empty)")
    _check_utf8(path)  # pyarrow keeps invalid bytes, and decoding fails later, deep inside datasets
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # its parser logs a second error line
    try:
        ds = datasets.load_dataset("json", data_files=path, split="train")
    except Exception as err:  # datasets wraps parser errors in several types
        raise UserInputError(
            f"{path}: not valid JSON or JSON Lines ({_json_problem(path) or type(err).__name__})"
        ) from None
    finally:
        datasets.utils.logging.set_verbosity(level)
    keys = ["instruction", "answer"] + ([unit_key] if unit_key else [])
    missing = set(keys) - set(ds.column_names)
    if missing:
        raise UserInputError(f"{path}: records lack the key(s) {sorted(missing)}")
    if isinstance(ds.features["answer"], (datasets.Sequence, datasets.List)):
        ds = _columns_to_records(ds, path, keys)
    if len(ds) == 0:
        raise UserInputError(f"{path}: no records")
    return ds.select_columns(keys)


def _check_utf8(path):
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise UserInputError(
                    f"{path}: not UTF-8 text (invalid byte near offset {offset + err.start})"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not UTF-8 text (the file ends inside a character)") from None


def _json_problem(path):
    """Where a file fails to parse, as JSON and as JSON Lines (called only after datasets failed)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        return "the file holds only whitespace"
    try:
        json.loads(text)
    except json.JSONDecodeError as whole:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                if number == 1:  # not JSON Lines either: report the position in the whole document
                    return f"line {whole.lineno}, column {whole.colno}: {whole.msg}"
                return f"line {number}, column {err.colno}: {err.msg}"
        return f"line {whole.lineno}, column {whole.colno}: {whole.msg}"
    return 'a JSON document that is neither {"instruction": [...], "answer": [...]} nor records'


def _columns_to_records(ds, path, keys):
    """A JSON object of columns arrives as one row of lists: explode it into records."""
    if len(ds) != 1:
        raise UserInputError(f"{path}: mixes list-valued and record-valued entries")
    row = ds[0]
    for key in keys[1:]:
        if len(row[key] or []) != len(row["instruction"] or []):
            raise UserInputError(
                f"{path}: 'instruction' has {len(row['instruction'] or [])} entries but "
                f"'{key}' has {len(row[key] or [])}"
            )
    for i, (instruction, answer) in enumerate(zip(row["instruction"] or [], row["answer"] or [])):
        _check_text(path, i, "instruction", instruction)  # before exploding: mixed types break datasets
        _check_text(path, i, "answer", answer)
    return ds.map(
        lambda batch: {key: batch[key][0] for key in keys}, batched=True, batch_size=1, remove_columns=ds.column_names
    )


def load_pubmed(dataset_dir: str | None = None, unit_key: str | None = None) -> datasets.DatasetDict:
    """The built PubMed DatasetDict as instruction/answer records with the seed's prompt (and the
    unit_key column, e.g. author, kept)."""
    dataset_dir = dataset_dir or DEFAULT_PUBMED_DIR
    if not os.path.isdir(dataset_dir):
        raise UserInputError(f"{dataset_dir}: PubMed data set not built; run `python scripts/prepare_pubmed.py` first")
    dd = datasets.load_from_disk(dataset_dir)
    if unit_key and unit_key not in dd["train"].column_names:
        raise UserInputError(
            f"{dataset_dir}: the built data set has no '{unit_key}' column (it has "
            f"{', '.join(dd['train'].column_names)}); rebuild it with `python -m scripts.prepare_pubmed`"
        )

    def records(batch):
        kept = {unit_key: batch[unit_key]} if unit_key else {}
        return {"instruction": [PUBMED_PROMPT] * len(batch["text"]), "answer": batch["text"], **kept}

    return datasets.DatasetDict(
        {split: ds.map(records, batched=True, remove_columns=ds.column_names) for split, ds in dd.items()}
    )


def load_raw_datasets(
    dataset_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    dataset_dir: str | None = None,
    unit_key: str | None = None,
) -> datasets.DatasetDict:
    """{'train': Dataset, 'validation': Dataset (optional)} of instruction/answer records; records
    keep their privacy unit's id under unit_key when it is given (validation records too, so that
    units shared with the training data can be found)."""
    if dataset_name is not None:
        if dataset_name != "pubmed_generation":
            raise UserInputError(f"--dataset_name {dataset_name}: unknown (known: pubmed_generation)")
        raw = load_pubmed(dataset_dir, unit_key)
    else:
        if train_file is None:
            raise UserInputError("give --train_file or --dataset_name")
        raw = datasets.DatasetDict({"train": load_records_file(train_file, unit_key)})
    if validation_file is not None:
        raw["validation"] = load_records_file(validation_file, unit_key)
    for split, ds in raw.items():
        _check_strings(ds, train_file if split == "train" else validation_file or split)
    return raw


def privacy_units(ds: datasets.Dataset, key: str, name: str) -> list[list[int]]:
    """Record indices grouped by their unit id under `key`, units in order of first appearance.
    An id must be text or a whole number: anything else is refused naming the record."""
    groups = {}
    for i, unit in enumerate(ds[key]):
        if isinstance(unit, bool) or not isinstance(unit, (str, int)):
            what = "missing or null" if unit is None else f"of type {type(unit).__name__}, not text or a whole number"
            raise UserInputError(f"{name}: record {i} (counting from 0): privacy unit '{key}' is {what}")
        groups.setdefault(unit, []).append(i)
    return list(groups.values())


def unit_keys(ds: datasets.Dataset, unit_key: str | None = None) -> list[bytes]:
    """One key per record: a hash of its text (instruction and answer: the same record read from any
    file or format gives the same key), or under unit_key a hash of its unit's id. The privacy
    ledger salts them; comparing keys finds records or units two data sets share."""
    if unit_key:
        values = (json.dumps(["unit", unit_key, unit]) for unit in ds[unit_key])
    else:
        values = (json.dumps(["record", i, a]) for i, a in zip(ds["instruction"], ds["answer"]))
    return [hashlib.blake2b(value.encode(), digest_size=16).digest() for value in values]


def check_disjoint(train: datasets.Dataset, validation: datasets.Dataset, unit_key: str | None, name: str) -> None:
    """Validation metrics are published exactly: no validation record (or privacy unit) may also be
    in the training data. Refused naming the first shared one."""
    training = set(unit_keys(train, unit_key))
    for i, key in enumerate(unit_keys(validation, unit_key)):
        if key in training:
            shared = (
                f"belongs to privacy unit '{unit_key}' = {validation[i][unit_key]!r}, which also has training records"
                if unit_key
                else "is also a training record"
            )
            raise UserInputError(
                f"{name}: record {i} (counting from 0) {shared}; validation data is published through its "
                "metrics and must share no record or privacy unit with the training data"
            )


def _check_strings(ds, name):
    for i, (instruction, answer) in enumerate(zip(ds["instruction"], ds["answer"])):
        _check_text(name, i, "instruction", instruction)
        _check_text(name, i, "answer", answer)


def _check_text(name, i, key, value):
    if not isinstance(value, str):
        what = "missing or null" if value is None else f"of type {type(value).__name__}, not text"
        raise UserInputError(f"{name}: record {i} (counting from 0): '{key}' is {what}")


# ----------------------------------------------------------------------------------------------
# Prompt format and tokenisation
# ----------------------------------------------------------------------------------------------


def join_prompt_answer(instruction: str, answer: str) -> str:
    """Training text = instruction, a space, answer (nothing added when either side is empty)."""
    if not instruction or not answer or instruction[-1].isspace():
        return instruction + answer
    return instruction + " " + answer


def encode(tokenizer, text: str) -> list[int]:
    """Token ids with the model's own special prefix; a BOS is prepended when the tokenizer has one
    but does not add it (GPT-2), so that an empty prompt still gives a starting token."""
    ids = tokenizer(text)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def encode_prompt(tokenizer, instruction: str) -> list[int]:
    """The prompt the model sees at generation time: exactly the prefix it was trained on."""
    return encode(tokenizer, instruction)


def tokenize_record(tokenizer, instruction: str, answer: str, block_size: int) -> dict:
    """input_ids (EOS appended after truncation to block_size - 1) and the prompt length."""
    prompt = encode_prompt(tokenizer, instruction)
    full = encode(tokenizer, join_prompt_answer(instruction, answer))
    prompt_len = 0
    for a, b in zip(prompt, full):  # the longest common prefix is the prompt (tokenizers may merge at the seam)
        if a != b:
            break
        prompt_len += 1
    truncated = len(full) > block_size - 1
    ids = full[: block_size - 1] + [tokenizer.eos_token_id]
    return {"input_ids": ids, "prompt_len": min(prompt_len, len(ids) - 1), "truncated": truncated}


def tokenize_dataset(ds: datasets.Dataset, tokenizer, block_size: int, desc: str = "Tokenizing") -> datasets.Dataset:
    """Cached by `datasets`: a rerun with the same tokenizer and block size does not retokenise."""
    return ds.map(
        lambda r: tokenize_record(tokenizer, r["instruction"], r["answer"], block_size),
        remove_columns=ds.column_names,
        desc=desc,
    )


class Collator:
    """Right-pads records of a micro-batch; labels are -100 on the prompt and on padding.

    An index of None is a masked dummy record: one pad token that attends to itself and has no
    label, so its loss and gradient are exactly zero."""

    def __init__(self, dataset, pad_token_id):
        self.dataset = dataset
        self.pad = pad_token_id

    def __call__(self, indices):
        indices = list(indices) or [None]
        rows = [self.dataset[i] if i is not None else None for i in indices]
        width = max(len(r["input_ids"]) if r else 1 for r in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            if r is None:
                attention[k, 0] = 1
                continue
            ids = torch.tensor(r["input_ids"])
            input_ids[k, : len(ids)] = ids
            attention[k, : len(ids)] = 1
            labels[k, r["prompt_len"] : len(ids)] = ids[r["prompt_len"] :]
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
