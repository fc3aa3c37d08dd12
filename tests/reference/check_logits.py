#!/usr/bin/env python3
"""Compare the kvserve engine's greedy decoding against the float64 reference.

    /usr/bin/python3 tests/reference/check_logits.py --kvserve build/kvserve \
        [--workdir DIR] [--dtypes f32,f16,q8_0] [--steps 32]

For each dtype: `kvserve model random --shape tiny --dtype D --seed S` writes a
model; for each fixed prompt, `kvserve run ... --temperature 0 --ignore-eos
--logits-out F.npy --json` decodes `steps` tokens. The reference (llama_ref.py)
is then fed the ENGINE's tokens (teacher forcing), so both see the same history
at every step, and we check:

  (a) logits: per step, max|engine - ref| / max|ref| over the vocabulary; the
      maximum over steps must be below 1e-4 (f32, f16) or 5e-2 (q8_0).
  (b) tokens: at every step the engine's token must equal the reference's
      argmax. A mismatch is tolerated as a near-tie only when
      (ref[ref_tok] - ref[engine_tok]) / max|ref| <= tie tolerance
      (default max(1e-3, 2 * logit tolerance), see README.md).
  (c) the engine's token must be the argmax of its own logits (ties allowed).
  (d) the model file is valid GGUF (no llama.cpp-compatibility issues) and its
      block matrices have the requested dtype.

Exit status: 0 all pass, 1 some check failed, 2 usage/setup error,
77 numpy unavailable (prints "SKIP: ...").
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

LOGIT_TOL = {"f32": 1e-4, "f16": 1e-4, "bf16": 1e-4, "q8_0": 5e-2}
GGML_NAME = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
BOS = 256

_TEXT = ("It was the best of times, it was the worst of times, it was the age "
         "of wisdom, it was the age of foolishness, it was the epoch of belief, "
         "it was the epoch of incredulity, it was the season of Light, it was "
         "the season of Darkness, it was the spring of hope, it was the winter "
         "of despair.")


def make_prompts():
    """Deterministic prompts: BOS (256) followed by byte ids < 256."""
    rnd = random.Random(20240601)
    medium = b"The quick brown fox jumps over the lazy dog"       # 43 bytes
    long_ = _TEXT.encode("ascii")[:199]
    return [
        ("bos", [BOS]),
        ("short", [BOS, 72, 101]),
        ("medium", [BOS] + list(medium)),
        ("random", [BOS] + [rnd.randrange(256) for _ in range(63)]),
        ("long", [BOS] + list(long_)),
    ]


def parse_engine_json(out):
    out = out.strip()
    try:
        obj = json.loads(out)
        if isinstance(obj, dict):
            return obj
    except ValueError:
        pass
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "tokens" in obj:
                return obj
    raise ValueError("no JSON object with \"tokens\" in the engine's stdout")


def run_cmd(cmd, timeout):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", "timed out after %ds" % timeout, time.time() - t0
    return (p.returncode, p.stdout.decode("utf-8", "replace"),
            p.stderr.decode("utf-8", "replace"), time.time() - t0)


def describe_cmd(cmd):
    return " ".join(cmd)


class Case:
    def __init__(self, dtype, prompt_name, prompt):
        self.dtype = dtype
        self.prompt_name = prompt_name
        self.prompt = prompt
        self.errors = []          # failure messages
        self.notes = []
        self.max_rel = None
        self.max_rel_step = None
        self.tokens_status = "-"
        self.min_gap = None       # smallest reference top-2 gap (relative)
        self.engine_s = None

    @property
    def ok(self):
        return not self.errors


def compare(np, case, eng_tokens, eng_logits, ref, steps, tol, tie_tol):
    """Fill case with the comparison of engine output against the reference."""
    n_vocab = ref.n_vocab
    if len(eng_tokens) != steps:
        case.errors.append("engine generated %d tokens, expected %d (--ignore-eos)"
                           % (len(eng_tokens), steps))
    if eng_logits.ndim != 2 or eng_logits.shape[1] != n_vocab:
        case.errors.append("logits shape %s, expected (n_steps, %d)"
                           % (eng_logits.shape, n_vocab))
        return
    if eng_logits.shape[0] != len(eng_tokens):
        case.errors.append("logits have %d steps but %d tokens were generated"
                           % (eng_logits.shape[0], len(eng_tokens)))
    if eng_logits.dtype != np.float32:
        case.errors.append("logits dtype is %s, the contract says float32"
                           % eng_logits.dtype)
    n = min(steps, len(eng_tokens), eng_logits.shape[0])
    if n == 0:
        case.errors.append("nothing to compare")
        return
    bad_ids = [t for t in eng_tokens[:n] if not (0 <= t < n_vocab)]
    if bad_ids:
        case.errors.append("engine produced token ids out of range: %s" % bad_ids[:5])
        return

    r = ref.generate(case.prompt, n, forced=eng_tokens[:n - 1])
    case.min_gap = float(r.top2_gap.min())
    a_all = eng_logits[:n].astype(np.float64)
    if not np.all(np.isfinite(a_all)):
        t = int(np.argmax(~np.all(np.isfinite(a_all), axis=1)))
        case.errors.append("engine logits are not finite at step %d" % t)
        return
    rel = np.abs(a_all - r.logits).max(axis=1) / np.maximum(
        np.abs(r.logits).max(axis=1), 1e-300)
    case.max_rel_step = int(np.argmax(rel))
    case.max_rel = float(rel[case.max_rel_step])
    over = np.nonzero(rel >= tol)[0]
    if over.size:
        t = int(over[0])
        case.errors.append(
            "logits diverge: first step over tolerance %d (rel err %.3e >= %.0e); "
            "max %.3e at step %d" % (t, rel[t], tol, case.max_rel, case.max_rel_step))

    mismatches, ties = [], []
    for t in range(n):
        a, b = a_all[t], r.logits[t]
        e, rt = int(eng_tokens[t]), r.tokens[t]
        if a[e] < a.max():
            case.errors.append(
                "step %d: engine emitted token %d but its own logits' argmax is %d "
                "(%.6g > %.6g): greedy sampling disagrees with --logits-out"
                % (t, e, int(np.argmax(a)), a.max(), a[e]))
        if e != rt:
            scale = max(np.abs(b).max(), 1e-300)
            gap = (b[rt] - b[e]) / scale
            msg = ("step %d: engine token %d, reference token %d; reference logits "
                   "%.6g vs %.6g (gap %.2e of max|logit|, ref top-2 gap %.2e, "
                   "tie tolerance %.0e)" % (t, e, rt, b[rt], b[e], gap,
                                            r.top2_gap[t], tie_tol))
            if gap > tie_tol:
                mismatches.append((t, msg))
            else:
                ties.append((t, msg))
    if mismatches:
        case.tokens_status = "NO@%d" % mismatches[0][0]
        case.errors.append("tokens differ, first divergent step: " + mismatches[0][1])
        case.errors.extend(m for _, m in mismatches[1:3])
    elif ties:
        case.tokens_status = "near-tie@%d" % ties[0][0]
        case.notes.append("tokens differ only at near-ties (teacher forcing "
                          "continued with the engine's tokens): " + ties[0][1])
    else:
        case.tokens_status = "identical"


def check_model_file(GGUFFile, path, dtype):
    errs = []
    try:
        g = GGUFFile(path)
    except Exception as e:  # noqa: BLE001
        return None, ["model file %s is not valid GGUF: %s" % (path, e)]
    for msg in g.issues:
        errs.append("GGUF issue in %s: %s" % (os.path.basename(path), msg))
    want = GGML_NAME.get(dtype)
    if want:
        wrong = []
        for name, info in g.tensors.items():
            if name.startswith("blk.") and name.endswith(".weight") and len(info.ne) == 2:
                if info.type_name != want:
                    wrong.append("%s=%s" % (name, info.type_name))
        if wrong:
            errs.append("model random --dtype %s wrote block matrices of another "
                        "type: %s" % (dtype, ", ".join(wrong[:4])))
    return g, errs


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kvserve", required=True, help="path to the kvserve binary")
    ap.add_argument("--workdir", default=None,
                    help="where models and logits go (kept); default: a temporary "
                         "directory, removed unless something fails")
    ap.add_argument("--dtypes", default="f32,f16,q8_0")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--timeout", type=int, default=600, help="seconds per engine command")
    ap.add_argument("--tie-tol", type=float, default=None,
                    help="relative gap below which a token mismatch is a near-tie "
                         "(default max(1e-3, 2 * logit tolerance of the dtype))")
    ap.add_argument("--prompts", default=None,
                    help="comma-separated subset of: bos,short,medium,random,long")
    args = ap.parse_args(argv)

    try:
        import numpy as np
    except ImportError as e:
        print("SKIP: numpy is not importable by %s (%s); run with /usr/bin/python3 "
              "and python3-numpy installed" % (sys.executable, e))
        return 77
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gguf_read import GGUFFile
    from llama_ref import LlamaRef

    kvserve = os.path.abspath(args.kvserve)
    if not (os.path.isfile(kvserve) and os.access(kvserve, os.X_OK)):
        print("error: --kvserve %s is not an executable file" % args.kvserve,
              file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in LOGIT_TOL:
            print("error: unknown dtype %r (known: %s)" % (d, ", ".join(LOGIT_TOL)),
                  file=sys.stderr)
            return 2
    if args.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    prompts = make_prompts()
    if args.prompts:
        want = set(p.strip() for p in args.prompts.split(","))
        unknown = want - set(n for n, _ in prompts)
        if unknown:
            print("error: unknown prompts %s" % sorted(unknown), file=sys.stderr)
            return 2
        prompts = [p for p in prompts if p[0] in want]

    tmp = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="kvs-check-logits-") if tmp else args.workdir
    os.makedirs(workdir, exist_ok=True)

    cases = []
    for dtype in dtypes:
        tol = LOGIT_TOL[dtype]
        tie_tol = args.tie_tol if args.tie_tol is not None else max(1e-3, 2 * tol)
        model = os.path.join(workdir, "tiny-%s-seed%d.gguf" % (dtype, args.seed))
        cmd = [kvserve, "model", "random", "--shape", "tiny", "--dtype", dtype,
               "--seed", str(args.seed), "--out", model]
        print("== %s: %s" % (dtype, describe_cmd(cmd)))
        rc, out, err, _ = run_cmd(cmd, args.timeout)
        if rc != 0 or not os.path.isfile(model):
            c = Case(dtype, "(model)", [])
            c.errors.append("model random failed (rc %s): %s" % (rc, err.strip()[-2000:]))
            cases.append(c)
            continue
        g, ferrs = check_model_file(GGUFFile, model, dtype)
        if g is None:
            c = Case(dtype, "(model)", [])
            c.errors.extend(ferrs)
            cases.append(c)
            continue
        try:
            t0 = time.time()
            ref = LlamaRef(g)
            print("   reference: %s n_vocab=%d tied_output=%s (loaded in %.2fs)"
                  % (ref.cfg.describe(), ref.n_vocab, ref.tied_output, time.time() - t0))
        except Exception as e:  # noqa: BLE001
            c = Case(dtype, "(model)", [])
            c.errors.extend(ferrs)
            c.errors.append("reference cannot load %s: %s" % (model, e))
            cases.append(c)
            continue
        if ferrs:
            c = Case(dtype, "(model)", [])
            c.errors.extend(ferrs)
            cases.append(c)
        if ref.cfg.n_head_kv[0] == ref.cfg.n_head[0]:
            print("   note: the model has no GQA (head_count_kv == head_count)")

        for pname, prompt in prompts:
            case = Case(dtype, pname, prompt)
            cases.append(case)
            if max(prompt) >= ref.n_vocab:
                case.errors.append("prompt ids exceed the vocabulary (%d)" % ref.n_vocab)
                continue
            npy = os.path.join(workdir, "logits-%s-%s.npy" % (dtype, pname))
            if os.path.exists(npy):
                os.remove(npy)
            cmd = [kvserve, "run", "--model", model,
                   "--prompt-tokens", ",".join(str(t) for t in prompt),
                   "--max-tokens", str(args.steps), "--temperature", "0",
                   "--ignore-eos", "--threads", str(args.threads),
                   # f32 KV keeps the comparison about the forward pass; small
                   # blocks and prefill chunks exercise paging and chunking.
                   "--kv-cache-dtype", "f32", "--block-size", "8",
                   "--batch-size", "48",
                   "--logits-out", npy, "--json"]
            rc, out, err, dt = run_cmd(cmd, args.timeout)
            if rc != 0:
                case.errors.append("engine run failed (rc %s): %s\n      command: %s"
                                   % (rc, err.strip()[-2000:], describe_cmd(cmd)))
                continue
            try:
                obj = parse_engine_json(out)
                toks = [int(t) for t in obj["tokens"]]
            except (ValueError, TypeError, KeyError) as e:
                case.errors.append("cannot parse the engine's --json output: %s; "
                                   "stdout tail: %r" % (e, out[-500:]))
                continue
            try:
                logits = np.load(npy, allow_pickle=False)
            except Exception as e:  # noqa: BLE001
                case.errors.append("cannot load --logits-out %s: %s" % (npy, e))
                continue
            case.engine_s = dt
            compare(np, case, toks, logits, ref, args.steps, tol, tie_tol)
            if case.errors:
                case.notes.append("command: %s" % describe_cmd(cmd))

    # ---- report ------------------------------------------------------------
    print()
    print("%-6s %-8s %5s %6s %12s %6s %7s %-14s %9s %8s %s" % (
        "dtype", "prompt", "len", "steps", "max rel err", "@step", "tol",
        "tokens", "min top2", "engine", "result"))
    for c in cases:
        mr = "%.3e" % c.max_rel if c.max_rel is not None else "-"
        ms = str(c.max_rel_step) if c.max_rel_step is not None else "-"
        mg = "%.1e" % c.min_gap if c.min_gap is not None else "-"
        es = "%.2fs" % c.engine_s if c.engine_s is not None else "-"
        print("%-6s %-8s %5s %6d %12s %6s %7.0e %-14s %9s %8s %s" % (
            c.dtype, c.prompt_name, len(c.prompt) if c.prompt else "-", args.steps,
            mr, ms, LOGIT_TOL[c.dtype], c.tokens_status, mg, es,
            "PASS" if c.ok else "FAIL"))
    failed = [c for c in cases if not c.ok]
    for c in cases:
        if c.errors or c.notes:
            print("\n[%s/%s]" % (c.dtype, c.prompt_name))
            for m in c.errors:
                print("  FAIL: %s" % m)
            for m in c.notes:
                print("  note: %s" % m)
    print()
    if failed:
        print("FAILED: %d of %d checks; files kept in %s" % (len(failed), len(cases), workdir))
        return 1
    print("OK: %d checks passed" % len(cases))
    if tmp:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
