#!/usr/bin/env python3
"""Independent float64 reference of the Llama forward pass (numpy only).

Reads a GGUF file with gguf_read.py, dequantizes every weight to float64 and
runs the forward pass of /work/shared/docs/gguf.md section 1.3:

    x = embd[tok]
    per layer:
        h = rmsnorm(x) * attn_norm
        q, k, v = h @ W{q,k,v}.T (+ b{q,k,v})
        RoPE on q and k at absolute positions (llama: NORM / interleaved pairs
        (x[2i], x[2i+1]); qwen2: NEOX / half-split pairs (x[i], x[i+n_rot/2]))
        causal attention, scale 1/sqrt(head_dim); GQA: query head h uses kv
        head h // (n_head // n_head_kv)
        x += o @ Wo.T (+ bo)
        h = rmsnorm(x) * ffn_norm
        x += (silu(h @ Wgate.T) * (h @ Wup.T)) @ Wdown.T
    logits = (rmsnorm(x) * output_norm) @ Wout.T   (Wout = token_embd if absent)

RoPE angle of pair i at position p: p * base^(-2i/n_rot) * freq_scale / ff_i,
with freq_scale = 1/rope.scaling.factor (linear scaling; 1 for "none") and
ff_i = rope_freqs.weight[i] when that tensor exists.

Products with Q8_0 weights take x as the engine's kernels define it
(kernels/kern.h, kern_round_x_q8): rounded per 32-value block to int8 with
scale max|x| / 127, as llama.cpp does.

Weights are held in memory as float64: meant for tiny test models only.

Library use:
    m = LlamaRef("model.gguf")
    r = m.generate([256, 72, 101], n_steps=32)           # own greedy choices
    r = m.generate(prompt, 32, forced=engine_tokens)     # teacher forcing
    r.logits (n_steps, n_vocab), r.tokens, r.top2_gap

Command line (mirrors `kvserve run`):
    /usr/bin/python3 llama_ref.py MODEL --prompt-tokens 256,72,101 \
        --max-tokens 32 [--logits-out FILE.npy] [--force-tokens 1,2,...]
"""

import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_read import GGUFFile  # noqa: E402

GGML_Q8_0 = 8
SUPPORTED_ARCHS = {"llama": "norm", "qwen2": "neox"}


class ModelError(Exception):
    pass


def _per_layer(val, n_layer, key):
    if isinstance(val, list):
        if len(val) != n_layer:
            raise ModelError("%s has %d entries, expected %d (block_count)"
                             % (key, len(val), n_layer))
        return [int(v) for v in val]
    return [int(val)] * n_layer


class LlamaConfig:
    def __init__(self, g):
        md = g.metadata
        arch = md.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelError("general.architecture %r is not supported (%s)"
                             % (arch, ", ".join(SUPPORTED_ARCHS)))
        self.arch = arch
        self.rope_type = SUPPORTED_ARCHS[arch]

        def req(k):
            key = "%s.%s" % (arch, k)
            if key not in md:
                raise ModelError("missing required key %s" % key)
            return md[key]

        def opt(k, default):
            return md.get("%s.%s" % (arch, k), default)

        self.n_embd = int(req("embedding_length"))
        self.n_layer = int(req("block_count"))
        self.n_ff = _per_layer(req("feed_forward_length"), self.n_layer,
                               "feed_forward_length")
        self.n_head = _per_layer(req("attention.head_count"), self.n_layer,
                                 "attention.head_count")
        self.n_head_kv = _per_layer(opt("attention.head_count_kv", self.n_head),
                                    self.n_layer, "attention.head_count_kv")
        for il in range(self.n_layer):
            h, hk = self.n_head[il], self.n_head_kv[il]
            if h <= 0 or hk <= 0 or h % hk:
                raise ModelError("layer %d: head_count %d is not a multiple of "
                                 "head_count_kv %d" % (il, h, hk))
        n_head0 = self.n_head[0]
        self.head_dim = int(opt("attention.key_length", self.n_embd // n_head0))
        self.head_dim_v = int(opt("attention.value_length", self.head_dim))
        self.n_rot = int(opt("rope.dimension_count", self.head_dim))
        if self.n_rot % 2 or self.n_rot > self.head_dim or self.n_rot <= 0:
            raise ModelError("rope.dimension_count %d is invalid for head_dim %d"
                             % (self.n_rot, self.head_dim))
        self.eps = float(req("attention.layer_norm_rms_epsilon"))
        self.rope_base = float(opt("rope.freq_base", 10000.0))
        stype = opt("rope.scaling.type", "linear")
        factor = opt("rope.scaling.factor", None)
        if factor is None:
            factor = opt("rope.scale_linear", 0.0)  # old key
        factor = float(factor)
        if stype == "none":
            self.freq_scale = 1.0
        elif stype == "linear":
            self.freq_scale = 1.0 if factor == 0.0 else 1.0 / factor
        else:
            raise ModelError("rope.scaling.type %r is not supported by the "
                             "reference (none, linear)" % stype)
        self.rope_scaling_type = stype
        self.context_length = opt("context_length", None)

    def describe(self):
        uniq = lambda v: v[0] if len(set(v)) == 1 else v  # noqa: E731
        return ("arch=%s n_embd=%d n_layer=%d n_head=%s n_head_kv=%s head_dim=%d "
                "n_ff=%s n_rot=%d rope=%s base=%g freq_scale=%g eps=%g" % (
                    self.arch, self.n_embd, self.n_layer, uniq(self.n_head),
                    uniq(self.n_head_kv), self.head_dim, uniq(self.n_ff),
                    self.n_rot, self.rope_type, self.rope_base, self.freq_scale,
                    self.eps))


class _Layer:
    pass


def round_x_q8(x):
    """x as a Q8_0 product sees it: per 32-value block, d = max|x| / 127 in
    float32 and q = x * float32(1 / d) rounded to nearest even."""
    x32 = x.astype(np.float32).reshape(x.shape[:-1] + (-1, 32))
    d = np.abs(x32).max(axis=-1, keepdims=True) / np.float32(127)
    safe = np.where(d > 0, d, np.float32(1))
    inv = np.where(d > 0, np.float32(1) / safe, np.float32(0)).astype(np.float32)
    q = np.rint(x32 * inv)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def rmsnorm(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
    # x * sigmoid(x), with sigmoid written through tanh so it cannot overflow.
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


class KVCache:
    """Per-layer K (S, n_head_kv, head_dim) and V (S, n_head_kv, head_dim_v)."""

    def __init__(self, cfg, capacity=64):
        self.n = 0
        self.cap = max(1, capacity)
        self.k = [np.zeros((self.cap, cfg.n_head_kv[il], cfg.head_dim))
                  for il in range(cfg.n_layer)]
        self.v = [np.zeros((self.cap, cfg.n_head_kv[il], cfg.head_dim_v))
                  for il in range(cfg.n_layer)]

    def reserve(self, n):
        if n <= self.cap:
            return
        cap = self.cap
        while cap < n:
            cap *= 2
        for lst in (self.k, self.v):
            for i, a in enumerate(lst):
                b = np.zeros((cap,) + a.shape[1:])
                b[:self.n] = a[:self.n]
                lst[i] = b
        self.cap = cap


class GenResult:
    def __init__(self, logits, tokens, fed, top2_gap):
        self.logits = logits      # (n_steps, n_vocab) float64
        self.tokens = tokens      # reference's own argmax at each step
        self.fed = fed            # tokens fed after each step (len n_steps-1)
        self.top2_gap = top2_gap  # (top1 - top2) / max|logit| at each step


class LlamaRef:
    def __init__(self, path_or_gguf):
        g = path_or_gguf if isinstance(path_or_gguf, GGUFFile) else GGUFFile(path_or_gguf)
        self.gguf = g
        cfg = self.cfg = LlamaConfig(g)

        def t(name, shape=None, required=True):
            if name not in g.tensors:
                if required:
                    raise ModelError("missing tensor %s" % name)
                return None
            a = g.tensor(name)
            if g.tensors[name].type == GGML_Q8_0:
                q8_weights.add(id(a))
            if shape is not None and a.shape != tuple(shape):
                raise ModelError("tensor %s has numpy shape %s (ne %s), expected %s"
                                 % (name, a.shape, list(g.tensors[name].ne),
                                    tuple(shape)))
            return a

        q8_weights = self._q8 = set()
        E = cfg.n_embd
        self.tok_embd = t("token_embd.weight")
        if self.tok_embd.ndim != 2 or self.tok_embd.shape[1] != E:
            raise ModelError("token_embd.weight has numpy shape %s, expected "
                             "(n_vocab, %d)" % (self.tok_embd.shape, E))
        self.n_vocab = self.tok_embd.shape[0]
        self.output_norm = t("output_norm.weight", (E,))
        self.output = t("output.weight", (self.n_vocab, E), required=False)
        self.tied_output = self.output is None
        if self.tied_output:
            self.output = self.tok_embd
        self.freq_factors = t("rope_freqs.weight", (cfg.n_rot // 2,),
                              required=False)

        need_bias = cfg.arch == "qwen2"
        self.layers = []
        for il in range(cfg.n_layer):
            p = "blk.%d." % il
            nh, nkv = cfg.n_head[il], cfg.n_head_kv[il]
            hd, hdv, ff = cfg.head_dim, cfg.head_dim_v, cfg.n_ff[il]
            L = _Layer()
            L.attn_norm = t(p + "attn_norm.weight", (E,))
            L.wq = t(p + "attn_q.weight", (nh * hd, E))
            L.wk = t(p + "attn_k.weight", (nkv * hd, E))
            L.wv = t(p + "attn_v.weight", (nkv * hdv, E))
            L.wo = t(p + "attn_output.weight", (E, nh * hdv))
            L.bq = t(p + "attn_q.bias", (nh * hd,), required=need_bias)
            L.bk = t(p + "attn_k.bias", (nkv * hd,), required=need_bias)
            L.bv = t(p + "attn_v.bias", (nkv * hdv,), required=need_bias)
            L.bo = t(p + "attn_output.bias", (E,), required=False)
            L.ffn_norm = t(p + "ffn_norm.weight", (E,))
            L.w_gate = t(p + "ffn_gate.weight", (ff, E))
            L.w_up = t(p + "ffn_up.weight", (ff, E))
            L.w_down = t(p + "ffn_down.weight", (E, ff))
            self.layers.append(L)

        half = cfg.n_rot // 2
        inv = cfg.rope_base ** (-2.0 * np.arange(half) / cfg.n_rot) * cfg.freq_scale
        if self.freq_factors is not None:
            inv = inv / self.freq_factors
        self.inv_freq = inv  # angle per unit position of each pair

    # ---- pieces ----------------------------------------------------------
    def mm(self, x, w):
        """x @ w.T, with x rounded as the engine's Q8_0 products round it."""
        if id(w) in self._q8:
            x = round_x_q8(x)
        return x @ w.T

    def rope(self, x, pos):
        """x: (T, H, D); pos: (T,) absolute positions. Returns a new array."""
        n_rot, half = self.cfg.n_rot, self.cfg.n_rot // 2
        theta = np.asarray(pos, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        c = np.cos(theta)[:, None, :]
        s = np.sin(theta)[:, None, :]
        out = x.copy()
        if self.cfg.rope_type == "norm":
            x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
            out[..., 0:n_rot:2] = x0 * c - x1 * s
            out[..., 1:n_rot:2] = x0 * s + x1 * c
        else:
            x0, x1 = x[..., 0:half], x[..., half:n_rot]
            out[..., 0:half] = x0 * c - x1 * s
            out[..., half:n_rot] = x0 * s + x1 * c
        return out

    def new_cache(self, capacity=64):
        return KVCache(self.cfg, capacity)

    def forward(self, tokens, cache):
        """Feed `tokens` at positions cache.n .. cache.n+T-1; returns logits
        (T, n_vocab) for every fed position and advances the cache."""
        cfg = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = tokens.shape[0]
        if T == 0:
            return np.zeros((0, self.n_vocab))
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError("token id out of range [0, %d)" % self.n_vocab)
        p0 = cache.n
        S = p0 + T
        cache.reserve(S)
        pos = np.arange(p0, S)
        # key s is visible to query t (absolute position p0+t) iff s <= p0+t
        mask = np.arange(S)[None, :] <= pos[:, None]          # (T, S)
        scale = 1.0 / math.sqrt(cfg.head_dim)

        x = self.tok_embd[tokens].copy()                       # (T, E)
        for il, L in enumerate(self.layers):
            nh, nkv = cfg.n_head[il], cfg.n_head_kv[il]
            hd, hdv = cfg.head_dim, cfg.head_dim_v
            h = rmsnorm(x, cfg.eps) * L.attn_norm
            q = self.mm(h, L.wq)
            k = self.mm(h, L.wk)
            v = self.mm(h, L.wv)
            if L.bq is not None:
                q = q + L.bq
            if L.bk is not None:
                k = k + L.bk
            if L.bv is not None:
                v = v + L.bv
            q = self.rope(q.reshape(T, nh, hd), pos)
            k = self.rope(k.reshape(T, nkv, hd), pos)
            cache.k[il][p0:S] = k
            cache.v[il][p0:S] = v.reshape(T, nkv, hdv)
            group = nh // nkv
            # np.repeat gives kv heads [0,0,..,1,1,..]: query head j -> j // group
            K = np.repeat(cache.k[il][:S], group, axis=1)      # (S, nh, hd)
            V = np.repeat(cache.v[il][:S], group, axis=1)      # (S, nh, hdv)
            sc = np.einsum("thd,shd->hts", q, K) * scale       # (nh, T, S)
            sc = np.where(mask[None, :, :], sc, -np.inf)
            sc = sc - sc.max(axis=-1, keepdims=True)
            p = np.exp(sc)
            p = p / p.sum(axis=-1, keepdims=True)
            o = np.einsum("hts,shd->thd", p, V).reshape(T, nh * hdv)
            x = x + self.mm(o, L.wo)
            if L.bo is not None:
                x = x + L.bo
            h = rmsnorm(x, cfg.eps) * L.ffn_norm
            x = x + self.mm(silu(self.mm(h, L.w_gate)) * self.mm(h, L.w_up), L.w_down)
        cache.n = S
        return self.mm(rmsnorm(x, cfg.eps) * self.output_norm, self.output)

    def logits_full(self, tokens):
        """Logits for every position of `tokens`, computed in one pass."""
        return self.forward(tokens, self.new_cache(len(tokens)))

    def generate(self, prompt, n_steps, forced=None):
        """Greedy decoding with a KV cache.

        Step 0 = logits after the whole prompt; step t = logits after feeding
        token t-1. Token t-1 is the reference's own argmax, or forced[t-1]
        when `forced` is given (teacher forcing). Returns a GenResult."""
        if len(prompt) == 0:
            raise ValueError("empty prompt")
        if forced is not None and len(forced) < n_steps - 1:
            raise ValueError("forced has %d tokens, need %d"
                             % (len(forced), n_steps - 1))
        cache = self.new_cache(len(prompt) + n_steps)
        logits = np.zeros((n_steps, self.n_vocab))
        own, fed, gaps = [], [], np.zeros(n_steps)
        if n_steps == 0:
            return GenResult(logits, own, fed, gaps)
        lg = self.forward(prompt, cache)[-1]
        for t in range(n_steps):
            logits[t] = lg
            tok = int(np.argmax(lg))
            own.append(tok)
            top2 = np.partition(lg, -2)[-2:] if lg.size > 1 else np.array([lg[0], lg[0]])
            gaps[t] = (top2[1] - top2[0]) / max(np.abs(lg).max(), 1e-300)
            if t == n_steps - 1:
                break
            nxt = int(forced[t]) if forced is not None else tok
            fed.append(nxt)
            lg = self.forward([nxt], cache)[-1]
        return GenResult(logits, own, fed, gaps)


def _parse_ids(s):
    return [int(x) for x in s.replace(" ", "").split(",") if x != ""]


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description="float64 reference Llama forward / greedy decoding")
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", required=True, help="comma-separated ids")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--force-tokens", default=None,
                    help="teacher forcing: feed these ids instead of the argmax")
    ap.add_argument("--logits-out", default=None, help="write (n_steps, n_vocab) float32 .npy")
    args = ap.parse_args(argv)
    m = LlamaRef(args.model)
    forced = _parse_ids(args.force_tokens) if args.force_tokens else None
    r = m.generate(_parse_ids(args.prompt_tokens), args.max_tokens, forced)
    if args.logits_out:
        np.save(args.logits_out, r.logits.astype(np.float32))
    print(json.dumps({"tokens": r.tokens, "top2_gap": [float(g) for g in r.top2_gap],
                      "config": m.cfg.describe(), "n_vocab": m.n_vocab,
                      "tied_output": m.tied_output}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
