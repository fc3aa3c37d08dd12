#!/usr/bin/python3
"""The engine against the training script's own PyTorch forward pass.

Loads a bundled model (GGUF) into weights/train.py's torch Model in float32,
and checks that `kvserve run --logits-out` agrees with it (relative error
< 1e-3 per step) and that greedy text matches, on a few prompts.

  /usr/bin/python3 tests/reference/check_torch.py --kvserve build/kvserve
      [--model weights/kvserve-main.gguf] [--steps 24]

Exit 77 (skipped) when torch or numpy is missing, or no bundled model exists.
"""
import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def skip(msg):
    print("SKIP: " + msg)
    sys.exit(77)


try:
    import numpy as np
    import torch
except ImportError as e:  # reported as skipped by ctest
    skip("python3-torch or numpy not installed (%s)" % e)

sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "weights"))
from gguf_read import GGUFFile  # noqa: E402
import train  # noqa: E402


def load_torch_model(path):
    g = GGUFFile(path)
    c = {
        "d": int(g.get("llama.embedding_length")),
        "layers": int(g.get("llama.block_count")),
        "heads": int(g.get("llama.attention.head_count")),
        "kv_heads": int(g.get("llama.attention.head_count_kv")),
        "ff": int(g.get("llama.feed_forward_length")),
    }
    m = train.Model(c, rope_base=float(g.get("llama.rope.freq_base", 10000.0)))

    def t(name):
        return torch.tensor(np.asarray(g.tensor(name), dtype=np.float32))

    sd = {"embd.weight": t("token_embd.weight"), "norm.weight": t("output_norm.weight").reshape(-1),
          "out.weight": t("output.weight")}
    for i in range(c["layers"]):
        p, b = "blocks.%d." % i, "blk.%d." % i
        for ours, theirs in [("attn_norm.weight", "attn_norm.weight"), ("wq.weight", "attn_q.weight"),
                             ("wk.weight", "attn_k.weight"), ("wv.weight", "attn_v.weight"),
                             ("wo.weight", "attn_output.weight"), ("ffn_norm.weight", "ffn_norm.weight"),
                             ("w_gate.weight", "ffn_gate.weight"), ("w_up.weight", "ffn_up.weight"),
                             ("w_down.weight", "ffn_down.weight")]:
            v = t(b + theirs)
            sd[p + ours] = v.reshape(-1) if "norm" in ours else v
    m.load_state_dict(sd)
    return m.float().eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvserve", required=True)
    ap.add_argument("--model", default=os.path.join(ROOT, "weights", "kvserve-main.gguf"))
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    if not os.path.exists(args.model):
        skip("no bundled model at %s" % args.model)
    torch.set_num_threads(2)
    model = load_torch_model(args.model)
    prompts = [
        b"The grass is green. The sky is",
        b"There is an important info hidden inside a lot of irrelevant text. The pass key is 81523. "
        b"Remember it. 81523 is the pass key. The grass is green.\nWhat is the pass key? The pass key is",
        b" VAR QAZ = 40217.  VAR WSX = QAZ. The sky is blue. VAR EDC = WSX. \nQuestion: what is the "
        b"value of EDC? Answer: EDC =",
    ]
    worst, failed = 0.0, False
    with tempfile.TemporaryDirectory() as tmp:
        for i, p in enumerate(prompts):
            ids = [train.BOS] + list(p)
            npy = os.path.join(tmp, "l%d.npy" % i)
            cmd = [args.kvserve, "run", "--model", args.model, "--prompt-tokens",
                   ",".join(map(str, ids)), "--max-tokens", str(args.steps), "--temperature", "0",
                   "--ignore-eos", "--kv-cache-dtype", "f32", "--json", "--logits-out", npy]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print("engine failed: %s\n%s" % (" ".join(cmd), r.stderr))
                return 1
            eng = np.load(npy)
            toks = list(ids)
            out_ref = []
            errs = []
            with torch.no_grad():
                for s in range(args.steps):
                    lg = model(torch.tensor([toks]))[0, -1].double().numpy()
                    e = np.abs(eng[s] - lg).max() / np.abs(lg).max()
                    errs.append(e)
                    nxt = int(lg.argmax())
                    out_ref.append(nxt)
                    toks.append(int(eng[s].argmax()))  # follow the engine
            eng_toks = [int(x) for x in eng.argmax(axis=1)]
            same = eng_toks == out_ref
            worst = max(worst, max(errs))
            text = bytes(t for t in eng_toks if t < 256).decode("latin-1")
            print("prompt %d: max rel err %.2e, greedy text %s: %r" %
                  (i, max(errs), "identical" if same else "DIFFERS", text))
            if max(errs) >= 1e-3 or not same:
                failed = True
    print("worst relative error %.2e (limit 1e-3)" % worst)
    if failed:
        print("FAIL")
        return 1
    print("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
