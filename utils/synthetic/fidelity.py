"""Fidelity of a text set to real text: MAUVE on the base model's own hidden states (no feature
model to download), the length distribution and distinct-n."""

import contextlib
import os

import numpy as np
import torch


@torch.no_grad()
def hidden_state_features(model, records, start_token, batch_size=32):
    """One vector per record: the final hidden state at its last token, read after `start_token`
    (so that an empty record still has one), as MAUVE does with GPT-2's. Records are batched by
    length to avoid computing padding; the result keeps the input order."""
    order = sorted(range(len(records)), key=lambda i: len(records[i]))
    features = [None] * len(records)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        rows = [[start_token] + list(records[i]) for i in chunk]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):  # right padding: a causal model's last real token never sees it
            ids[k, : len(row)] = torch.tensor(row)
            mask[k, : len(row)] = 1
        out = model(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            output_hidden_states=True,
            logits_to_keep=1,
        )
        last = out.hidden_states[-1][torch.arange(len(rows)), mask.sum(1) - 1]
        for k, i in enumerate(chunk):
            features[i] = last[k].float().cpu().numpy()
    return np.stack(features)


def mauve_scores(p_features, q_features, seeds):
    """MAUVE (Pillutla et al. 2021) of p against q, once per k-means seed: quantisation into
    n/10 clusters is the noisy part of the estimate, so its spread over seeds is reported."""
    import mauve

    scores = []
    for seed in seeds:
        with _quiet_stderr():
            result = mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=seed, verbose=False)
        scores.append(float(result.mauve))
    return scores


@contextlib.contextmanager
def _quiet_stderr():
    """faiss warns in C++, on file descriptor 2, that n/10 clusters would like more points: that is
    MAUVE's documented setting, and the warning would bury the console report."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def length_stats(records, cut):
    """Tokens per record (after cutting to `cut`)."""
    lengths = np.array([len(r) for r in records])
    if lengths.size == 0:
        return {}
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90]).tolist()
    return {
        "mean": round(float(lengths.mean()), 2),
        "p10": p10,
        "median": p50,
        "p90": p90,
        "share_empty": round(float((lengths == 0).mean()), 4),
        "share_at_cut": round(float((lengths >= cut).mean()), 4),
    }


def distinct_n(records, n):
    """Distinct n-grams over all n-grams of a set (Li et al. 2016): low values mean repetition."""
    grams = [tuple(r[i : i + n]) for r in records for i in range(len(r) - n + 1)]
    return round(len(set(grams)) / len(grams), 4) if grams else 0.0
