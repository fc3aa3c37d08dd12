#!/usr/bin/python3
"""Trains kvserve's bundled byte-level Llama models (main and draft).

Runs on Debian's python3-torch 1.13 on a CPU (bf16 autocast, 2 threads) and
on a CUDA PyTorch 2.x.  Deterministic seeds, a checkpoint every few minutes
(resumed automatically), an eval printed as it trains.  Curriculum:

  boot   copy task at context 64 until copy accuracy >= 0.8
  128 -> 256 -> 512 -> 1024 (-> 2048)  task mixture, each stage gated on
         passkey >= 0.9 at that length, with 25% replay of shorter lengths

Usage:
  /usr/bin/python3 weights/train.py --out weights/ckpt/main [--preset main|draft]
      [--minutes M] [--max-len 1024]
then weights/export_gguf.py turns the checkpoint into GGUF.
"""
import argparse
import math
import os
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402

BOS, EOS, PAD = 256, 257, 258
VOCAB = 259

PRESETS = {
    # ~3M parameters: the largest that reaches the passkey targets within
    # about two hours of two-core CPU time.
    "main": dict(d=256, layers=4, heads=4, kv_heads=2, ff=704),
    # the draft for speculative prefill: same vocabulary, 2 layers
    "draft": dict(d=128, layers=2, heads=2, kv_heads=1, ff=352),
}


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(T, hd, base, device):
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, device=device, dtype=torch.float64) / hd))
    ang = torch.arange(T, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x, cos, sin):
    # Interleaved pairs (x[2i], x[2i+1]): GGUF's llama (NORM) layout, so the
    # export needs no Q/K permutation.  x: [B, H, T, hd]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return torch.stack((y0, y1), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, h, kvh = c["d"], c["heads"], c["kv_heads"]
        self.h, self.kvh, self.hd = h, kvh, d // h
        self.attn_norm = RMSNorm(d)
        self.wq = nn.Linear(d, h * self.hd, bias=False)
        self.wk = nn.Linear(d, kvh * self.hd, bias=False)
        self.wv = nn.Linear(d, kvh * self.hd, bias=False)
        self.wo = nn.Linear(h * self.hd, d, bias=False)
        self.ffn_norm = RMSNorm(d)
        self.w_gate = nn.Linear(d, c["ff"], bias=False)
        self.w_up = nn.Linear(d, c["ff"], bias=False)
        self.w_down = nn.Linear(c["ff"], d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.wk(h).view(B, T, self.kvh, self.hd).transpose(1, 2)
        v = self.wv(h).view(B, T, self.kvh, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        g = self.h // self.kvh
        # GQA: consecutive query heads share a KV head (as GGUF llama).
        q = q.reshape(B, self.kvh, g * T, self.hd)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.hd))
        att = att.view(B, self.kvh, g, T, T) + mask
        att = torch.softmax(att.float(), dim=-1).type_as(v)
        o = (att.view(B, self.kvh, g * T, T) @ v).view(B, self.h, T, self.hd)
        x = x + self.wo(o.transpose(1, 2).reshape(B, T, self.h * self.hd))
        h = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class Model(nn.Module):
    def __init__(self, c, rope_base=10000.0):
        super().__init__()
        self.c = c
        self.rope_base = rope_base
        self.embd = nn.Embedding(VOCAB, c["d"])
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["layers"]))
        self.norm = RMSNorm(c["d"])
        self.out = nn.Linear(c["d"], VOCAB, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        for b in self.blocks:
            nn.init.normal_(b.wo.weight, std=0.02 / math.sqrt(2 * c["layers"]))
            nn.init.normal_(b.w_down.weight, std=0.02 / math.sqrt(2 * c["layers"]))

    def forward(self, tok):
        B, T = tok.shape
        cos, sin = rope_tables(T, self.c["d"] // self.c["heads"], self.rope_base, tok.device)
        # additive causal mask (faster than masked_fill on CPU)
        mask = torch.full((T, T), float("-inf"), device=tok.device).triu(1)
        x = self.embd(tok)
        for b in self.blocks:
            x = b(x, cos, sin, mask)
        return self.out(self.norm(x))


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def encode(prompt, answer, T):
    """BOS + prompt + answer, cut/padded to T+1 tokens; returns (tokens,
    weights) where the answer bytes weigh 5 and padding 0."""
    toks = [BOS] + list(prompt) + list(answer)
    w = [1.0] * (1 + len(prompt)) + [5.0] * len(answer)
    toks, w = toks[:T + 1], w[:T + 1]
    while len(toks) < T + 1:
        toks.append(PAD)
        w.append(0.0)
    return toks, w


def sample(rng, kind, T, corpus):
    try:
        return sample_kind(rng, kind, T, corpus)
    except tasks.TooShort:
        # the task does not fit at this length: dense key/value recall does
        return sample_kind(rng, "kv", T, corpus)


def sample_kind(rng, kind, T, corpus):
    noise = None if rng.random() < 0.5 else corpus
    L = T  # bytes of prompt + answer (BOS makes T + 1 tokens)
    if kind == "copy":
        return encode(*tasks.copy_task(rng, L), T)
    if kind == "passkey":
        return encode(*tasks.passkey(rng, L, corpus=noise), T)
    if kind == "multikey":
        return encode(*tasks.niah_multikey(rng, L, corpus=noise, n_keys=rng.choice([2, 3, 4, 6])), T)
    if kind == "vt":
        return encode(*tasks.vt(rng, L, corpus=noise, hops=rng.choice([2, 3, 4]),
                                chains=rng.choice([1, 2])), T)
    if kind == "kv":
        data, spans = tasks.kv_dense(rng, L, corpus=noise)
        toks = [BOS] + list(data)
        w = [1.0] * len(toks)
        for a, b in spans:
            for i in range(a + 1, min(b + 1, len(w))):
                w[i] = 5.0
        toks, w = toks[:T + 1], w[:T + 1]
        while len(toks) < T + 1:
            toks.append(PAD)
            w.append(0.0)
        return toks, w
    # plain text
    data = tasks.filler(rng, L, corpus)
    return encode(data, b"", T)


MIX = [("passkey", 0.25), ("kv", 0.25), ("multikey", 0.15), ("vt", 0.15), ("copy", 0.05),
       ("text", 0.15)]


def batch(rng, T, B, corpus, boot, lengths_done):
    seqs, ws = [], []
    for _ in range(B):
        t = T
        if not boot and lengths_done and rng.random() < 0.25:
            t = rng.choice(lengths_done)  # replay shorter lengths
        if boot:
            kind = "copy"
        else:
            r, acc = rng.random(), 0.0
            for kind, p in MIX:
                acc += p
                if r < acc:
                    break
        s, w = sample(rng, kind, t, corpus)
        s += [PAD] * (T + 1 - len(s))
        w += [0.0] * (T + 1 - len(w))
        seqs.append(s)
        ws.append(w)
    x = torch.tensor(seqs, dtype=torch.long)
    return x[:, :-1], x[:, 1:], torch.tensor(ws)[:, 1:]


# ---------------------------------------------------------------------------
# Eval: teacher-forced exact match of the answer (= greedy decoding of it)
# ---------------------------------------------------------------------------

EVAL_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@torch.no_grad()
def eval_task(model, kind, T, n, device, seed=1234):
    rng = random.Random(seed + T)
    hits = 0
    bs = max(1, min(n, 8192 // T))
    items = []
    for i in range(n):
        d = EVAL_DEPTHS[i % len(EVAL_DEPTHS)]
        try:
            if kind == "passkey":
                p, a = tasks.passkey(rng, T, depth=d)
            elif kind == "multikey":
                p, a = tasks.niah_multikey(rng, T, depth=d)
            elif kind == "vt":
                p, a = tasks.vt(rng, T, depth=d)
            else:
                p, a = tasks.copy_task(rng, T)
        except tasks.TooShort:
            return float("nan")
        items.append(([BOS] + list(p), list(a)))
    model.eval()
    for i in range(0, n, bs):
        chunk = items[i:i + bs]
        L = max(len(p) + len(a) for p, a in chunk)
        x = torch.full((len(chunk), L), PAD, dtype=torch.long)
        for j, (p, a) in enumerate(chunk):
            x[j, :len(p) + len(a)] = torch.tensor(p + a)
        with autocast(device):
            logits = model(x.to(device))
        pred = logits.argmax(-1).cpu()
        for j, (p, a) in enumerate(chunk):
            ok = all(pred[j, len(p) - 1 + k].item() == a[k] for k in range(len(a)))
            hits += ok
    model.train()
    return hits / n


def autocast(device):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ---------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="checkpoint path prefix")
    ap.add_argument("--preset", default="main", choices=sorted(PRESETS))
    ap.add_argument("--minutes", type=float, default=120.0, help="stop after this wall time")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tokens-per-batch", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval-every", type=float, default=90.0, help="seconds")
    ap.add_argument("--ckpt-every", type=float, default=180.0, help="seconds")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    corpus = tasks.load_corpus()
    cfg = PRESETS[args.preset]
    model = Model(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    stages = [64] + [L for L in (128, 256, 512, 1024, 2048, 4096) if L <= args.max_len]
    state = {"stage": 0, "step": 0, "tokens": 0, "elapsed": 0.0, "log": [], "done": []}
    ckpt = args.out + ".pt"
    if os.path.exists(ckpt):
        blob = torch.load(ckpt, map_location=device)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["opt"])
        state = blob["state"]
        rng.setstate(blob["rng"])
        torch.set_rng_state(blob["torch_rng"])
        print("resumed %s at stage %d (T=%d), step %d, %.1f min" %
              (ckpt, state["stage"], stages[state["stage"]], state["step"], state["elapsed"] / 60))
    print("preset %s: %d parameters, device %s, stages %s" % (args.preset, n_params, device, stages))
    sys.stdout.flush()

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(ckpt)), exist_ok=True)
        tmp = ckpt + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state,
                    "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                    "config": cfg, "preset": args.preset, "max_len": stages[state["stage"]]},
                   tmp)
        os.replace(tmp, ckpt)

    t_start = time.time() - state["elapsed"]
    last_eval = last_ckpt = time.time()
    while True:
        T = stages[state["stage"]]
        boot = state["stage"] == 0
        B = max(1, args.tokens_per_batch // T)
        x, y, w = batch(rng, T, B, corpus, boot, [L for L in stages[1:state["stage"]]])
        x, y, w = x.to(device), y.to(device), w.to(device)
        warm = min(1.0, (state["step"] + 1) / 100)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm
        with autocast(device):
            logits = model(x)
        loss = (F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1), reduction="none")
                * w.reshape(-1)).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["tokens"] += B * T
        now = time.time()
        state["elapsed"] = now - t_start
        if now - last_eval >= args.eval_every:
            last_eval = now
            if boot:
                acc = eval_task(model, "copy", 64, 64, device)
                line = "step %d tok %.2fM %.1fmin T=%d loss %.3f copy %.2f" % (
                    state["step"], state["tokens"] / 1e6, state["elapsed"] / 60, T, loss.item(), acc)
                gate = acc >= 0.8
            else:
                # Fewer prompts at long contexts, where each costs more.
                ne = max(20, 40 * 512 // max(T, 512))
                pk = eval_task(model, "passkey", T, ne, device)
                mk = eval_task(model, "multikey", T, ne, device)
                vv = eval_task(model, "vt", T, ne, device)
                line = ("step %d tok %.2fM %.1fmin T=%d loss %.3f passkey %.2f multikey %.2f vt %.2f"
                        % (state["step"], state["tokens"] / 1e6, state["elapsed"] / 60, T,
                           loss.item(), pk, mk, vv))
                gate = pk >= 0.9
            print(line)
            sys.stdout.flush()
            state["log"].append(line)
            # The interval counts training time: an eval at long context
            # can take longer than the interval itself.
            last_eval = time.time()
            if gate and state["stage"] + 1 < len(stages):
                state["done"].append(T)
                state["stage"] += 1
                print("-> stage %d: T=%d" % (state["stage"], stages[state["stage"]]))
                save()
                last_ckpt = now
        if now - last_ckpt >= args.ckpt_every:
            save()
            last_ckpt = now
        if state["elapsed"] >= args.minutes * 60:
            save()
            print("time budget reached at stage T=%d" % T)
            break


if __name__ == "__main__":
    main()
