"""Longest verbatim token span each synthetic record shares with any training record.

A span of length L of a query is shared when the same L tokens occur contiguously inside one
training record (spans never run across two records). The longest such L is found for all queries
at once by a parallel binary search over L: "some L-span of this query is shared" is monotone in L,
so each round halves every query's interval, and each distinct L tested costs one vectorised pass
over the training tokens (8M for the PubMed train split), comparing 64-bit hashes of L-token
windows. The number of passes is bounded by the distinct lengths the searches visit (a few dozen),
not by the number of queries: tokenising, hashing and scanning the whole train split for 1,024
queries takes about 25 s of CPU time, where comparing every query with every record would take hours.

Hashes: each token id is first mapped to a random 64-bit value (so structured inputs cannot line
up with the polynomial), then windows are hashed as polynomials modulo 2^64 with a random odd base.
A false match needs two different windows with equal 64-bit hashes: about 1e-7 over a whole PubMed
run. `locate` compares tokens exactly, so an example shown to the curator is always a real match.
"""

import numpy as np

# query hashes are first looked up in a bitmap of 2^BUCKET_BITS buckets: one gather per corpus window
BUCKET_BITS = 22


class Hasher:
    """A random hash function of token windows (seeded, so runs are reproducible)."""

    def __init__(self, vocab_size, seed=0):
        rng = np.random.default_rng(seed)
        self.table = rng.integers(0, 2**63, size=vocab_size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.base = int(rng.integers(1, 2**62)) * 2 + 1
        self.vocab_size = vocab_size


class HashedRecords:
    """Records of token ids, flattened, with prefix sums that give any window's hash in O(1):
    hash(t[i:i+L]) = (G[i+L] - G[i]) * B^-i, G[k] = sum_{j<k} R[t[j]] B^j, all modulo 2^64."""

    def __init__(self, records, hasher):
        lengths = np.fromiter((len(r) for r in records), dtype=np.int64, count=len(records))
        self.lengths = lengths
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        n = int(self.starts[-1])
        self.tokens = np.fromiter((t for r in records for t in r), dtype=np.int64, count=n)
        if n and (self.tokens.min() < 0 or self.tokens.max() >= hasher.vocab_size):
            raise ValueError("token id outside the vocabulary")
        self.record_end = np.repeat(self.starts[1:], lengths)  # a window must not pass its record's end
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps: that is the modulo 2^64
            powers = np.cumprod(np.full(n + 1, hasher.base, dtype=np.uint64), dtype=np.uint64)
            inverses = np.cumprod(np.full(n + 1, pow(hasher.base, -1, 1 << 64), dtype=np.uint64), dtype=np.uint64)
            # B^j for j = 0..n: shift the cumulative products by one
            self.powers = np.concatenate([[np.uint64(1)], powers[:-1]])
            self.inverse_powers = np.concatenate([[np.uint64(1)], inverses[:-1]])
            self.prefix = np.zeros(n + 1, dtype=np.uint64)
            np.cumsum(hasher.table[self.tokens] * self.powers[:n], dtype=np.uint64, out=self.prefix[1:])

    def __len__(self):
        return len(self.lengths)

    def hashes(self, length, positions):
        with np.errstate(over="ignore"):
            return (self.prefix[positions + length] - self.prefix[positions]) * self.inverse_powers[positions]

    def record_of(self, position):
        return int(np.searchsorted(self.starts, position, side="right") - 1)


def _found(corpus, query_hashes, length):
    """For each query window hash: does the same window occur among the corpus windows of `length`?"""
    if corpus.tokens.size < length:
        return np.zeros(query_hashes.size, dtype=bool)
    with np.errstate(over="ignore"):  # every window, record boundaries ignored until the candidates
        hashes = (corpus.prefix[length:] - corpus.prefix[:-length]) * corpus.inverse_powers[:-length]
    wanted, inverse = np.unique(query_hashes, return_inverse=True)
    shift = np.uint64(64 - BUCKET_BITS)
    buckets = np.zeros(1 << BUCKET_BITS, dtype=bool)
    buckets[wanted >> shift] = True
    candidates = np.flatnonzero(buckets[hashes >> shift])
    candidates = candidates[candidates + length <= corpus.record_end[candidates]]
    at = np.minimum(np.searchsorted(wanted, hashes[candidates]), wanted.size - 1)
    present = np.zeros(wanted.size, dtype=bool)
    present[at[wanted[at] == hashes[candidates]]] = True
    return present[inverse]


def longest_shared_spans(queries, corpus, hasher):
    """For each query (a list of token ids): the length of its longest span that occurs verbatim in
    one record of `corpus` (HashedRecords built with `hasher`), and where the first such span starts
    in the query (-1 when the length is 0). Two int64 arrays."""
    q = HashedRecords(queries, hasher)
    lo = np.zeros(len(q), dtype=np.int64)
    hi = q.lengths.copy()
    where = np.full(len(q), -1, dtype=np.int64)
    while (open_ := np.flatnonzero(lo < hi)).size:
        mid = (lo[open_] + hi[open_] + 1) // 2
        for length in np.unique(mid).tolist():
            chosen = open_[mid == length]
            count = q.lengths[chosen] - length + 1
            owner = np.repeat(chosen, count)
            # the window starts of each chosen query, one run of positions per query
            offsets = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)
            starts = q.starts[owner] + offsets
            hit = _found(corpus, q.hashes(length, starts), length)
            winners, first = np.unique(owner[hit], return_index=True)
            lo[winners] = length
            where[winners] = offsets[hit][first]
            hi[np.setdiff1d(chosen, winners, assume_unique=True)] = length - 1
    return lo, where


def locate(span, corpus):
    """(record index, offset in it) of the first exact occurrence of the token list `span` in the
    corpus records, or None. Used only for the few examples shown on the console."""
    length = len(span)
    if length == 0:
        return None
    wanted = np.asarray(span, dtype=np.int64)
    candidates = np.flatnonzero(corpus.tokens == wanted[0])
    candidates = candidates[candidates + length <= corpus.record_end[candidates]]
    for offset in range(1, length):  # narrow the candidates one token at a time
        candidates = candidates[corpus.tokens[candidates + offset] == wanted[offset]]
        if candidates.size == 0:
            return None
    if candidates.size == 0:
        return None
    record = corpus.record_of(int(candidates[0]))
    return record, int(candidates[0] - corpus.starts[record])


def span_summary(lengths, thresholds=(8, 16, 32)):
    """Distribution of the longest shared span over a set's records (tokens)."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return {}
    quantiles = np.percentile(lengths, [50, 90, 99]).tolist()
    return {
        "mean": round(float(lengths.mean()), 3),
        "median": quantiles[0],
        "p90": quantiles[1],
        "p99": quantiles[2],
        "max": int(lengths.max()),
        **{f"share_at_least_{t}": round(float((lengths >= t).mean()), 4) for t in thresholds},
        "histogram": np.bincount(lengths).tolist(),
    }
