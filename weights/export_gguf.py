#!/usr/bin/python3
"""Exports a train.py checkpoint to GGUF v3 (architecture llama, byte-level
"gpt2" vocabulary with no merges), as F32, F16 or Q8_0.

  /usr/bin/python3 weights/export_gguf.py weights/ckpt/main.pt weights/kvserve-main.gguf \
      [--dtype f16|f32|q8_0] [--context N] [--name NAME]

Tensor names and layouts follow GGUF llama: a torch Linear weight [out, in]
is stored as ne = {in, out}; RoPE was trained interleaved (GGUF NORM), so
Q and K need no permutation.
"""
import argparse
import struct
import sys

import numpy as np
import torch

ALIGN = 32
T_F32, T_F16, T_Q8_0 = 0, 1, 8
V_U32, V_I32, V_F32, V_BOOL, V_STR, V_ARR, V_U64 = 4, 5, 6, 7, 8, 9, 10


def byte_token(b):
    """GPT-2 bytes_to_unicode spelling of byte b."""
    ok = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if b in ok:
        return chr(b)
    n = sum(1 for c in range(b) if c not in ok)
    return chr(256 + n)


def gstr(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value):
    out = gstr(key) + struct.pack("<I", vtype)
    if vtype == V_U32:
        out += struct.pack("<I", value)
    elif vtype == V_U64:
        out += struct.pack("<Q", value)
    elif vtype == V_F32:
        out += struct.pack("<f", value)
    elif vtype == V_BOOL:
        out += struct.pack("<B", 1 if value else 0)
    elif vtype == V_STR:
        out += gstr(value)
    elif vtype == V_ARR:
        etype, items = value
        out += struct.pack("<IQ", etype, len(items))
        for it in items:
            if etype == V_STR:
                out += gstr(it)
            elif etype == V_I32:
                out += struct.pack("<i", it)
    return out


def quantize_q8_0(a):
    a = a.astype(np.float32).reshape(-1, 32)
    amax = np.abs(a).max(axis=1)
    d = amax / 127.0
    inv = np.where(d != 0, 1.0 / np.where(d == 0, 1, d), 0.0)
    q = np.round(a * inv[:, None])  # numpy rounds half to even; ggml away from 0
    q = np.where(np.abs(a * inv[:, None] - np.trunc(a * inv[:, None])) == 0.5,
                 np.trunc(a * inv[:, None]) + np.sign(a), q)
    out = np.zeros((a.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.astype(np.int8).view(np.uint8)
    return out.tobytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="f16", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--context", type=int, default=0, help="context_length (default: trained)")
    ap.add_argument("--name", default="")
    args = ap.parse_args()

    blob = torch.load(args.ckpt, map_location="cpu")
    c, sd = blob["config"], blob["model"]
    ctx = args.context or int(blob.get("max_len", 1024))
    hd = c["d"] // c["heads"]
    name = args.name or ("kvserve %s (byte-level, trained)" % blob.get("preset", "model"))

    tensors = []  # (name, numpy array [rows, cols], type)

    def mat(n, key):
        tensors.append((n, sd[key].float().numpy(), None))

    def vec(n, key):
        tensors.append((n, sd[key].float().numpy().reshape(1, -1), T_F32))

    mat("token_embd.weight", "embd.weight")
    vec("output_norm.weight", "norm.weight")
    mat("output.weight", "out.weight")
    for i in range(c["layers"]):
        p = "blocks.%d." % i
        vec("blk.%d.attn_norm.weight" % i, p + "attn_norm.weight")
        mat("blk.%d.attn_q.weight" % i, p + "wq.weight")
        mat("blk.%d.attn_k.weight" % i, p + "wk.weight")
        mat("blk.%d.attn_v.weight" % i, p + "wv.weight")
        mat("blk.%d.attn_output.weight" % i, p + "wo.weight")
        vec("blk.%d.ffn_norm.weight" % i, p + "ffn_norm.weight")
        mat("blk.%d.ffn_gate.weight" % i, p + "w_gate.weight")
        mat("blk.%d.ffn_up.weight" % i, p + "w_up.weight")
        mat("blk.%d.ffn_down.weight" % i, p + "w_down.weight")

    wtype = {"f32": T_F32, "f16": T_F16, "q8_0": T_Q8_0}[args.dtype]
    datas = []
    for n, a, t in tensors:
        t = wtype if t is None else t
        if t == T_Q8_0 and a.shape[1] % 32 != 0:
            t = T_F16
        if t == T_F32:
            d = a.astype("<f4").tobytes()
        elif t == T_F16:
            d = a.astype("<f2").tobytes()
        else:
            d = quantize_q8_0(a)
        datas.append((n, a.shape, t, d))

    meta = [
        kv("general.architecture", V_STR, "llama"),
        kv("general.name", V_STR, name),
        kv("general.file_type", V_U32, {T_F32: 0, T_F16: 1, T_Q8_0: 7}[wtype]),
        kv("general.quantization_version", V_U32, 2),
        kv("general.alignment", V_U32, ALIGN),
        kv("kvserve.trained_context", V_U32, int(blob.get("max_len", ctx))),
        kv("llama.context_length", V_U32, ctx),
        kv("llama.embedding_length", V_U32, c["d"]),
        kv("llama.block_count", V_U32, c["layers"]),
        kv("llama.feed_forward_length", V_U32, c["ff"]),
        kv("llama.attention.head_count", V_U32, c["heads"]),
        kv("llama.attention.head_count_kv", V_U32, c["kv_heads"]),
        kv("llama.attention.layer_norm_rms_epsilon", V_F32, 1e-5),
        kv("llama.rope.freq_base", V_F32, 10000.0),
        kv("llama.rope.dimension_count", V_U32, hd),
        kv("llama.vocab_size", V_U32, 259),
        kv("tokenizer.ggml.model", V_STR, "gpt2"),
        kv("tokenizer.ggml.pre", V_STR, "gpt-2"),
        kv("tokenizer.ggml.tokens", V_ARR,
           (V_STR, [byte_token(b) for b in range(256)] + ["<|bos|>", "<|eos|>", "<|pad|>"])),
        kv("tokenizer.ggml.token_type", V_ARR, (V_I32, [1] * 256 + [3, 3, 3])),
        kv("tokenizer.ggml.merges", V_ARR, (V_STR, [])),
        kv("tokenizer.ggml.bos_token_id", V_U32, 256),
        kv("tokenizer.ggml.eos_token_id", V_U32, 257),
        kv("tokenizer.ggml.padding_token_id", V_U32, 258),
        kv("tokenizer.ggml.add_bos_token", V_BOOL, True),
    ]
    infos, off = [], 0
    for n, shape, t, d in datas:
        rows, cols = shape
        dims = [cols] if rows == 1 else [cols, rows]
        infos.append(gstr(n) + struct.pack("<I", len(dims)) +
                     b"".join(struct.pack("<Q", x) for x in dims) + struct.pack("<IQ", t, off))
        off += (len(d) + ALIGN - 1) // ALIGN * ALIGN
    head = b"GGUF" + struct.pack("<IQQ", 3, len(datas), len(meta)) + b"".join(meta) + b"".join(infos)
    with open(args.out, "wb") as f:
        f.write(head)
        f.write(b"\0" * ((-len(head)) % ALIGN))
        for _, _, _, d in datas:
            f.write(d)
            f.write(b"\0" * ((-len(d)) % ALIGN))
    print("wrote %s: %s, %d tensors, context %d" % (args.out, args.dtype, len(datas), ctx))


if __name__ == "__main__":
    sys.exit(main())
