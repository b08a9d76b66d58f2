"""What scripts/evaluate_synthetic.py shows: the curator's console examples of copied spans, the
results table and the plot."""

import numpy as np

from utils.synthetic.memorisation import locate

THRESHOLDS = (8, 16, 32)
CONTEXT = 12  # training tokens shown on each side of a copied span


def worst_examples(label, records, lengths, where, corpus, tokenizer, count, log):
    """The `count` longest copies of a set, with the training text around them: console only (the
    training text is private; the report never holds it)."""
    order = [i for i in np.argsort(-lengths, kind="stable")[:count] if lengths[i] > 0]
    if not order:
        return
    log(f"  [{label}] longest spans shared with a training record (console only: training text is private):")
    for i in order:
        span = records[i][where[i] : where[i] + lengths[i]]
        found = locate(span, corpus)
        if found is None:  # a hash collision: the scan's length would be wrong, say so rather than hide it
            log(f"    record {i}: {lengths[i]} tokens reported but not found verbatim (hash collision)")
            continue
        record, offset = found
        start = int(corpus.starts[record]) + offset
        before = corpus.tokens[max(int(corpus.starts[record]), start - CONTEXT) : start].tolist()
        after = corpus.tokens[start + len(span) : min(int(corpus.starts[record + 1]), start + len(span) + CONTEXT)]
        log(
            f"    record {i}: {lengths[i]} tokens, training record {record:,} at token {offset}: "
            f"...{_one_line(tokenizer.decode(before))}[[{_one_line(tokenizer.decode(span))}]]"
            f"{_one_line(tokenizer.decode(after.tolist()))}..."
        )


def _one_line(text):
    return " ".join(text.split()) if text.strip() else text


def _cell(entry, key, digits=3):
    value = (entry or {}).get(key)
    if value is None:
        return "-"
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def table_rows(report):
    """One row per set: label, then the figures of each measure ('-' when not measured)."""
    rows = []
    for label, entry in report["sets"].items():
        utility, fidelity, memo = entry.get("utility"), entry.get("fidelity"), entry.get("memorisation")
        row = [
            label,
            str(report["settings"]["num_records"]),
            _cell(utility, "relative_performance"),
            _cell(utility, "accuracy"),
            _cell(utility, "perplexity", 1),
            _cell(fidelity, "mauve"),
        ]
        row.append(f"{fidelity['distinct_2']:.3f}" if fidelity else "-")
        row.append(f"{fidelity['length_tokens']['mean']:.1f}" if fidelity else "-")
        if memo:
            row += [f"{memo[f'share_at_least_{t}']:.3f}" for t in THRESHOLDS]
            row += [f"{memo['median']:g}", str(memo["max"])]
        else:
            row += ["-"] * (len(THRESHOLDS) + 2)
        rows.append(row)
    return rows


HEADER = (
    ["set", "records", "relative perf.", "accuracy", "perplexity", "MAUVE", "distinct-2", "length"]
    + [f"span>={t}" for t in THRESHOLDS]
    + ["median span", "max span"]
)


def report_table(report):
    rows = [HEADER] + table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    settings = report["settings"]
    notes = [
        f"Texts cut to {settings['max_tokens']} tokens; mean ± standard deviation over {settings['seeds']} seeds.",
        "relative perf.: next-token accuracy on real test records of a small LM trained on the set, over that of "
        "the same LM trained on as many real training records (same token budget).",
        f"MAUVE: against {settings['test_records']} real test records, on the base model's last hidden states.",
        "span>=L: share of records whose longest span found verbatim in a training record has at least L tokens; "
        "for 'real': held-out test records (what unseen text shares by chance).",
    ]
    if report.get("releases_non_private_statistics"):
        notes.append("Not covered by epsilon: " + report["privacy_note"] + ".")
    return "\n".join(lines + [""] + notes)


def plot_report(report, path):
    """Relative performance, MAUVE, and the share of records above each shared-span length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = report["sets"]
    labels = list(sets)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (measure, key, title) in zip(
        axes[:2],
        (
            ("utility", "relative_performance", "Relative performance"),
            ("fidelity", "mauve", "MAUVE against real test text"),
        ),
    ):
        shown = [label for label in labels if sets[label].get(measure)]
        means = [sets[label][measure][key]["mean"] for label in shown]
        stds = [sets[label][measure][key]["std"] for label in shown]
        ax.bar(shown, means, yerr=stds, capsize=4, color=[f"C{labels.index(label)}" for label in shown])
        ax.set_title(title)
        ax.set_ylim(0, max([1.05] + [m + s + 0.05 for m, s in zip(means, stds)]))
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    for label in labels:
        memo = sets[label].get("memorisation")
        if not memo:
            continue
        counts = np.array(memo["histogram"], dtype=float)
        at_least = counts[::-1].cumsum()[::-1] / counts.sum()  # share of records with a span >= L
        name = "real held-out (test)" if label == "real" else label
        ax.step(np.arange(len(at_least)), at_least, where="post", color=f"C{labels.index(label)}", label=name)
    for t in THRESHOLDS:
        ax.axvline(t, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("longest span shared with a training record (tokens)")
    ax.set_ylabel("share of records with a span at least this long")
    ax.set_title("Memorisation")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
