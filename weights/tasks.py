"""Synthetic long-context tasks for kvserve's bundled models: passkey,
multi-key needle and variable tracking, in byte-level text.

The exact prompt formats here are the contract with `kvserve eval`
(serve/srv_eval.c), which generates the same prompts in C with the same
noise filler; training additionally uses real text from Debian packages as
filler.  Every generator returns (prompt_bytes, answer_bytes).
"""
import glob
import gzip
import os
import random

# Classic passkey filler (as in the passkey and RULER noise tasks).
NOISE = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = (b"There is an important info hidden inside a lot of irrelevant text. "
                 b"Find it and memorize it. I will quiz you about the important information there.\n")


def load_corpus(max_bytes=8 << 20):
    """Plain English-ish text from files every Debian system (or a docs
    package) carries; used as filler while training."""
    paths = sorted(glob.glob("/usr/share/common-licenses/*"))
    paths += sorted(glob.glob("/usr/share/doc/python3.11/html/_sources/**/*.txt", recursive=True))
    paths += sorted(glob.glob("/usr/share/doc/*/copyright"))
    out, total = [], 0
    for p in paths:
        try:
            if os.path.isdir(p):
                continue
            with (gzip.open(p, "rb") if p.endswith(".gz") else open(p, "rb")) as f:
                data = f.read()
        except OSError:
            continue
        data = bytes(b for b in data if b == 10 or 32 <= b < 127)
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n".join(out) if out else NOISE * 1000


def digits(rng, n=5):
    return str(rng.randrange(10 ** (n - 1), 10 ** n)).encode()


def word(rng, n=6):
    return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def upper_name(rng, n=3):
    return bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(n))


def filler(rng, n, corpus):
    """n bytes of filler: noise (corpus None) or a random corpus window."""
    if n <= 0:
        return b""
    if corpus is None:
        reps = NOISE * (n // len(NOISE) + 2)
        return reps[:n]
    start = rng.randrange(0, max(1, len(corpus) - n - 1))
    chunk = corpus[start:start + n]
    if len(chunk) < n:
        chunk = (chunk + NOISE * (n // len(NOISE) + 2))[:n]
    return chunk


def fill_with(parts, total, rng, corpus, depths):
    """Places `parts` (needles) inside filler so the whole is `total` bytes;
    depths[i] in [0, 1] is the relative position of part i."""
    fixed = sum(len(p) for p in parts)
    room = max(0, total - fixed)
    cuts = sorted(int(d * room) for d in depths)
    out, prev = [], 0
    order = sorted(range(len(parts)), key=lambda i: depths[i])
    for ci, pi in zip(cuts, order):
        out.append(filler(rng, ci - prev, corpus))
        out.append(parts[pi])
        prev = ci
    out.append(filler(rng, room - prev, corpus))
    return b"".join(out)


class TooShort(ValueError):
    pass


def passkey(rng, length, depth=None, corpus=None):
    """length: total bytes of prompt + answer (the model adds BOS).  The
    introduction is left out when it would not fit with the needle."""
    key = digits(rng)
    needle = b" The pass key is " + key + b". Remember it. " + key + b" is the pass key. "
    question = b"\nWhat is the pass key? The pass key is"
    answer = b" " + key
    need = len(needle) + len(question) + len(answer)
    if need > length:
        raise TooShort("passkey")
    intro = PASSKEY_INTRO if need + len(PASSKEY_INTRO) <= length else b""
    body = length - len(intro) - len(question) - len(answer)
    d = rng.random() if depth is None else depth
    return intro + fill_with([needle], body, rng, corpus, [d]) + question, answer


MK_NEEDLE, MK_QA = 48, 92  # bytes of one needle; of question + answer


def niah_multikey(rng, length, depth=None, corpus=None, n_keys=4):
    """Several key/value needles; the question asks for one of them.  Fewer
    keys are used when n_keys do not fit in `length`."""
    while n_keys > 1 and MK_NEEDLE * n_keys + MK_QA > length:
        n_keys -= 1
    keys = []
    while len(keys) < n_keys:
        k = word(rng)
        if k not in keys:
            keys.append(k)
    vals = [digits(rng) for _ in keys]
    needles = [b" The special magic number for " + k + b" is: " + v + b". " for k, v in zip(keys, vals)]
    target = rng.randrange(n_keys)
    question = b"\nWhat is the special magic number for " + keys[target] + \
        b"? The special magic number for " + keys[target] + b" is:"
    answer = b" " + vals[target]
    if sum(map(len, needles)) + len(question) + len(answer) > length:
        raise TooShort("niah-multikey")
    body = length - len(question) - len(answer)
    d = rng.random() if depth is None else depth
    depths = [rng.random() for _ in keys]
    depths[target] = d
    return fill_with(needles, body, rng, corpus, depths) + question, answer


def vt(rng, length, depth=None, corpus=None, hops=3, chains=2):
    """Variable tracking: VAR A = 12345. ... VAR B = A. ... VAR C = B.
    The question asks the value of the last variable of one chain; the
    first assignment sits at `depth`, later hops after it.  Fewer chains
    are used when they do not fit in `length`."""
    while chains > 1 and chains * (18 + 16 * (hops - 1)) + 57 > length:
        chains -= 1
    used = set()

    def fresh():
        while True:
            n = upper_name(rng)
            if n not in used:
                used.add(n)
                return n
    parts, depths = [], []
    target_last, target_val = None, None
    d0 = rng.random() if depth is None else depth
    for c in range(chains):
        val = digits(rng)
        names = [fresh() for _ in range(hops)]
        start = d0 if c == 0 else rng.random()
        for h, nm in enumerate(names):
            src = val if h == 0 else names[h - 1]
            parts.append(b" VAR " + nm + b" = " + src + b". ")
            # hops spread over the rest of the context after the first
            depths.append(start + (1.0 - start) * h / hops)
        if c == 0:
            target_last, target_val = names[-1], val
    question = b"\nQuestion: what is the value of " + target_last + b"? Answer: " + target_last + b" ="
    answer = b" " + target_val
    if sum(map(len, parts)) + len(question) + len(answer) > length:
        raise TooShort("vt")
    body = length - len(question) - len(answer)
    return fill_with(parts, body, rng, corpus, depths) + question, answer


def copy_task(rng, length):
    """Boot stage: a random string, then the same string again (the second
    copy is the answer), which grows induction heads quickly."""
    half = (length - 3) // 2
    s = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(half))
    return s + b"\n|", b" " + s[:length - half - 3]


def kv_dense(rng, length, corpus=None):
    """Training only: many key/value pairs and several queries, so every
    sequence supervises key matching.  Returns (bytes, answer spans)."""
    pairs = []
    out = bytearray()
    spans = []
    while len(out) < length * 0.55:
        k, v = word(rng), digits(rng)
        pairs.append((k, v))
        out += b"The special magic number for " + k + b" is: " + v + b". "
        if rng.random() < 0.3:
            out += filler(rng, rng.randrange(8, 60), corpus)
    while len(out) < length:
        k, v = pairs[rng.randrange(len(pairs))]
        q = b"\nWhat is the special magic number for " + k + b"? The special magic number for " + k + b" is:"
        out += q
        spans.append((len(out), len(out) + 6))
        out += b" " + v + b"."
    out = bytes(out[:length])
    spans = [(a, min(b, length)) for a, b in spans if a < length]
    return out, spans
