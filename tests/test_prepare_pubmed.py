"""scripts/prepare_pubmed.py: parsing, dates, de-duplication, split, errors; real shipped files."""

import gzip
import os

import pytest
from datasets import load_from_disk

from scripts import prepare_pubmed
from utils.cli import run_cli

FILLER = " It was measured in a prospective cohort and compared with a matched control group."


def long_text(i):
    return f"Study {i} examined whether treatment {i} changes blood pressure in adults.{FILLER * 3}"


def article(pmid, abstract=None, article_date=None, pub_date=None, medline_date=None, authors=None):
    """One <PubmedArticle>; abstract is plain text, a list of (label, xml) sections, or None;
    authors a list of (last name, initials) or a collective name (default: one author per PMID)."""
    parts = [
        f'<PubmedArticle><MedlineCitation Status="MEDLINE"><PMID Version="1">{pmid}</PMID>',
        "<Article><Journal><JournalIssue><PubDate>",
    ]
    if pub_date:
        tags = ("Year", "Month", "Day")
        parts += [f"<{tag}>{value}</{tag}>" for tag, value in zip(tags, pub_date)]
    if medline_date:
        parts.append(f"<MedlineDate>{medline_date}</MedlineDate>")
    parts.append(f"</PubDate></JournalIssue></Journal><ArticleTitle>Title {pmid}</ArticleTitle>")
    if isinstance(abstract, str):
        parts.append(f"<Abstract><AbstractText>{abstract}</AbstractText></Abstract>")
    elif abstract:
        sections = "".join(
            f'<AbstractText Label="{label}">{xml}</AbstractText>' if label else f"<AbstractText>{xml}</AbstractText>"
            for label, xml in abstract
        )
        parts.append(f"<Abstract>{sections}<CopyrightInformation>(c) Nobody</CopyrightInformation></Abstract>")
    authors = [(f"Author{int(pmid) % 7}", "AB"), ("Second", "C")] if authors is None else authors
    if authors:
        parts.append(f"<AuthorList>{''.join(map(author_xml, authors))}</AuthorList>")
    if article_date:
        y, m, d = article_date
        parts.append(
            f'<ArticleDate DateType="Electronic"><Year>{y}</Year><Month>{m}</Month><Day>{d}</Day></ArticleDate>'
        )
    parts.append("</Article></MedlineCitation></PubmedArticle>")
    return "".join(parts)


def author_xml(author):
    if isinstance(author, tuple):
        return f"<Author><LastName>{author[0]}</LastName><Initials>{author[1]}</Initials></Author>"
    return f"<Author><CollectiveName>{author}</CollectiveName></Author>"


def test_first_author_as_medline_writes_it():
    import xml.etree.ElementTree as ET

    def first(authors):
        return prepare_pubmed.first_author(
            ET.fromstring(article(7, "x", authors=authors)).find("MedlineCitation/Article"), "7"
        )

    assert first([("McCulloch", "B"), ("Whithead", "CJ")]) == "McCulloch B"
    assert first(["Study Group on Tests"]) == "Study Group on Tests"
    assert first([]) == "pmid:7"  # no author: a unit of its own


def xml_file(body):
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE PubmedArticleSet PUBLIC '
        '"-//NLM//DTD PubMedArticle, 1st January 2019//EN" "https://dtd.nlm.nih.gov/x.dtd">\n'
        f"<PubmedArticleSet>\n{body}\n</PubmedArticleSet>\n"
    )


STRUCTURED = [
    ("BACKGROUND", "Hypertension is common in older adults."),
    ("METHODS", "We gave <i>drug X</i> to 40 patients (H<sub>2</sub>O control)."),
    (None, "Unlabelled section continues the abstract."),
    ("RESULTS", "Blood pressure fell by 10 mmHg." + FILLER * 2),
]
STRUCTURED_TEXT = (
    "BACKGROUND: Hypertension is common in older adults.\n"
    "METHODS: We gave drug X to 40 patients (H2O control).\n"
    "Unlabelled section continues the abstract.\n"
    "RESULTS: Blood pressure fell by 10 mmHg." + FILLER * 2
)
N_EXTRA = 60  # plain records inside the window, so that every split gets some


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pubmed_xml")
    first = [
        article(101, STRUCTURED, article_date=("2023", "08", "03"), pub_date=("2023", "Oct")),
        article(102, None, pub_date=("2023", "Aug", "02")),  # no abstract
        article(103, long_text(103), pub_date=("2023", "Aug", "05")),
        article(104, long_text(104), pub_date=("2023", "Sep", "10")),  # outside
        article(105, "Too short to keep.", pub_date=("2023", "Aug", "04")),  # too short
        article(106, long_text(103), pub_date=("2023", "08", "06")),  # same text as 103
        article(107, long_text(107), medline_date="2023 Aug-Sep"),
        article(108, long_text(108), pub_date=("2023",)),  # 2023-01-01
        article(109, "Old version. " + long_text(109), pub_date=("2023", "Aug", "01")),
        article(110, long_text(110), pub_date=("2023", "Aug", "07")),  # deleted later
    ] + [article(1000 + i, long_text(1000 + i), pub_date=("2023", "Aug", f"0{1 + i % 7}")) for i in range(N_EXTRA)]
    second = [
        article(109, long_text(109), pub_date=("2023", "Aug", "01")),  # newer version
        article(111, long_text(111), article_date=("2023", "8", "7"), pub_date=("2024", "Jan")),
        article(112, long_text(112), pub_date=("2023", "Jul", "31")),  # outside
        '<DeleteCitation><PMID Version="1">110</PMID><PMID Version="1">999</PMID></DeleteCitation>',
    ]
    gz = tmp / "update1.xml.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(xml_file("\n".join(first)))
    plain = tmp / "update2.xml"
    plain.write_text(xml_file("\n".join(second)), encoding="utf-8")
    return [str(gz), str(plain)]


def run(inputs, out, *extra):
    argv = [
        "--input",
        *inputs,
        "--output_dir",
        str(out),
        "--validation_fraction",
        "0.2",
        "--test_fraction",
        "0.2",
        *extra,
    ]
    prepare_pubmed.main(argv)
    return load_from_disk(str(out))


def as_records(dataset_dict):
    return {r["pmid"]: (split, r) for split in dataset_dict for r in dataset_dict[split]}


def test_window_records_text_dates_and_drops(inputs, tmp_path, capsys):
    dd = run(inputs, tmp_path / "ds", "--start_date", "2023-08-01", "--end_date", "2023-08-07")
    assert list(dd) == ["train", "validation", "test"]
    assert all(dd[s].column_names == ["text", "pmid", "pub_date", "author"] for s in dd)
    records = as_records(dd)
    expected = {"101", "103", "107", "109", "111"} | {str(1000 + i) for i in range(N_EXTRA)}
    assert set(records) == expected
    assert records["101"][1]["text"] == STRUCTURED_TEXT
    assert records["101"][1]["pub_date"] == "2023-08-03"  # ArticleDate wins over PubDate
    assert records["103"][1]["pub_date"] == "2023-08-05"
    assert records["107"][1]["pub_date"] == "2023-08-01"  # MedlineDate "2023 Aug-Sep"
    assert records["109"][1]["text"] == long_text(109)  # latest version of the PMID
    assert records["103"][1]["author"] == f"Author{103 % 7} AB"  # the first author, MEDLINE style
    assert records["111"][1]["pub_date"] == "2023-08-07"
    assert all(len(dd[s]) > 0 for s in dd)
    out = capsys.readouterr().out
    for line in [
        f"train: {len(dd['train'])} records",
        "dropped no_abstract: 1",
        "dropped shorter_than_min_chars: 1",
        "dropped duplicate_text: 1",
        "dropped older_version_of_pmid: 1",
        "dropped deleted_citation: 1",
        "dropped outside_date_window: 3",
    ]:
        assert line in out.splitlines()
    assert not [n for n in os.listdir(tmp_path) if n != "ds"]  # no temporary folder left


def test_no_window_dates_and_deterministic_split(inputs, tmp_path):
    a = as_records(run(inputs, tmp_path / "a"))
    b = as_records(run(inputs, tmp_path / "b"))
    assert a == b
    assert {p: r["pub_date"] for p, (_, r) in a.items() if p in ("104", "108", "112")} == {
        "104": "2023-09-10",
        "108": "2023-01-01",
        "112": "2023-07-31",
    }
    assert "110" not in a and "105" not in a and "102" not in a
    # A record's split depends only on its PMID, not on the other records or the date window.
    windowed = as_records(run(inputs, tmp_path / "c", "--start_date", "2023-08-01"))
    assert all(a[p][0] == split for p, (split, _) in windowed.items())
    dd = load_from_disk(str(tmp_path / "a"))
    pmids = [set(dd[s]["pmid"]) for s in dd]
    texts = [set(dd[s]["text"]) for s in dd]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not pmids[i] & pmids[j] and not texts[i] & texts[j]


def test_rerun_replaces_existing_output(inputs, tmp_path):
    run(inputs, tmp_path / "ds")
    dd = run(inputs, tmp_path / "ds", "--start_date", "2023-08-05", "--end_date", "2023-08-05")
    assert {r["pub_date"] for s in dd for r in dd[s]} == {"2023-08-05"}
    assert os.listdir(tmp_path) == ["ds"]


def error_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: prepare_pubmed.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_errors_are_one_line_and_leave_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "out" / "ds"
    missing = str(tmp_path / "nope.xml.gz")
    assert missing in error_line(capsys, ["--input", inputs[0], missing, "--output_dir", str(out)])
    broken = tmp_path / "broken.xml"
    broken.write_text(xml_file(article(1, long_text(1)))[:-40])
    err = error_line(capsys, ["--input", str(broken), "--output_dir", str(out)])
    assert str(broken) in err and "malformed XML" in err
    truncated = tmp_path / "truncated.xml.gz"
    truncated.write_bytes(open(inputs[0], "rb").read()[:500])
    err = error_line(capsys, ["--input", str(truncated), "--output_dir", str(out)])
    assert str(truncated) in err
    err = error_line(
        capsys, ["--input", *inputs, "--output_dir", str(out), "--start_date", "2030-01-01", "--end_date", "2030-01-07"]
    )
    assert "no abstracts left in 2030-01-01..2030-01-07" in err
    assert not out.exists() and not (out.parent.exists() and os.listdir(out.parent))


@pytest.mark.slow
def test_shipped_files(tmp_path, capsys):
    out = tmp_path / "pubmed"
    prepare_pubmed.main(["--output_dir", str(out)])
    dd = load_from_disk(str(out))
    assert len(dd["train"]) > 20_000 and len(dd["validation"]) > 500 and len(dd["test"]) > 500
    pmids = [set(dd[s]["pmid"]) for s in dd]
    texts = [set(dd[s]["text"]) for s in dd]
    for i in range(3):
        assert len(pmids[i]) == len(texts[i]) == len(dd[list(dd)[i]])  # no duplicates inside
        for j in range(i + 1, 3):
            assert not pmids[i] & pmids[j] and not texts[i] & texts[j]
    sample = dd["train"][0]
    assert len(sample["text"]) >= 200 and sample["pmid"].isdigit()
    assert len(sample["pub_date"]) == 10 and sample["pub_date"][4] == "-"
    assert "train: " in capsys.readouterr().out
