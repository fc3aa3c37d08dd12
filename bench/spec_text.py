#!/usr/bin/python3
"""Speculative decoding on text through the server: `kvserve bench --dataset`.

Builds a JSON Lines dataset of text prompts from the licence texts every
Debian system has (/usr/share/common-licenses, the files of
/usr/share/doc/*/copyright; seeded, so every run gets the same prompts),
then for each server configuration (plain decoding first: the baseline;
prompt lookup; the draft model, exact and rejection) starts
`kvserve serve`, runs `kvserve bench --dataset` at each concurrency and
temperature, and prints output tokens/s, the ratio to plain decoding at the
same concurrency and temperature, and the share of proposals accepted.
Writes every run's summary to --json (default bench/out/spec_text.json).

The bundled models were trained with this kind of text as filler, so this
is text they know, not a held-out corpus: the acceptance rates are those of
in-domain prose.  Usage:
  bench/spec_text.py [--build build] [--model weights/kvserve-main.gguf]
                     [--draft weights/kvserve-draft.gguf] [--k 4]
                     [--concurrency 1,8] [--temperature 0,1]
                     [--num-requests 24] [--prompt-chars 600] [--output-len 128]
"""
import argparse
import glob
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_dataset(path, n, chars, out_len, seed):
    """n prompts of about `chars` characters: runs of paragraphs from
    licence texts, cut at a word boundary."""
    files = sorted(glob.glob("/usr/share/common-licenses/*"))
    files += sorted(glob.glob("/usr/share/doc/*/copyright"))[:200]
    paras = []
    for f in files:
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        paras += [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n")]
    paras = [p for p in paras if len(p) >= 80 and p.isascii()]
    if not paras:
        raise SystemExit("spec_text: no licence text found under /usr/share")
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            i, text = rng.randrange(len(paras)), ""
            while len(text) < chars:
                text += paras[i % len(paras)] + " "
                i += 1
            cut = text.rfind(" ", 0, chars)
            f.write(json.dumps({"prompt": text[:cut if cut > 0 else chars] + " ",
                                "output_len": out_len}) + "\n")


def start(kvserve, model, threads, flags, log):
    # No prefix cache: every run prefills its prompts, as the first did.
    cmd = [kvserve, "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
           "--threads", str(threads), "--no-enable-prefix-caching"] + flags
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    t_end = time.time() + 60
    while time.time() < t_end:
        line = srv.stdout.readline()
        if not line:
            break
        m = re.match(r"kvserve: listening on (\S+)", line)
        if m:
            return srv, m.group(1)
    srv.kill()
    raise SystemExit("spec_text: `%s` did not start; see %s" % (" ".join(cmd), log.name))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--model", default=os.path.join(ROOT, "weights", "kvserve-main.gguf"))
    ap.add_argument("--draft", default=os.path.join(ROOT, "weights", "kvserve-draft.gguf"))
    ap.add_argument("--k", type=int, default=4, help="proposed tokens a step")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--temperature", default="0,1")
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--prompt-chars", type=int, default=600)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "out", "spec_text.json"))
    a = ap.parse_args()
    kvserve = os.path.join(a.build, "kvserve")
    concs = [int(x) for x in a.concurrency.split(",")]
    temps = [float(x) for x in a.temperature.split(",")]
    work = tempfile.mkdtemp(prefix="kvserve-spec-text-")
    data = os.path.join(work, "text.jsonl")
    make_dataset(data, a.num_requests, a.prompt_chars, a.output_len, a.seed)

    k = str(a.k)
    configs = [("plain", []),
               ("ngram", ["--num-speculative-tokens", k]),
               ("draft exact", ["--num-speculative-tokens", k, "--speculative-method", "draft",
                                "--draft-model", a.draft]),
               ("draft rejection", ["--num-speculative-tokens", k, "--speculative-method",
                                    "draft", "--draft-model", a.draft,
                                    "--speculative-acceptance", "rejection"])]
    rows, base = [], {}
    log = open(os.path.join(work, "server.log"), "w")
    for name, flags in configs:
        srv, addr = start(kvserve, a.model, a.threads, flags, log)
        try:
            for c in concs:
                for t in temps:
                    out = os.path.join(work, "bench.json")
                    cmd = [kvserve, "bench", "--addr", addr, "--dataset", data,
                           "--num-requests", str(a.num_requests), "--concurrency", str(c),
                           "--temperature", str(t), "--seed", str(a.seed),
                           "--json", out, "--no-progress"]
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
                    if r.returncode != 0:
                        raise SystemExit("spec_text: %s failed (exit %d): %s" % (
                            " ".join(cmd), r.returncode, r.stderr[-500:]))
                    with open(out) as f:
                        s = json.load(f)["summary"]
                    tps = s["output_throughput"]
                    if name == "plain":
                        base[(c, t)] = tps
                    drafted = s["spec_draft_tokens"]
                    rows.append({"config": name, "concurrency": c, "temperature": t,
                                 "output_tok_s": tps, "vs_plain": tps / base[(c, t)],
                                 "tpot_ms_p50": s["tpot_ms"]["p50"],
                                 "spec_draft_tokens": drafted,
                                 "spec_accepted_tokens": s["spec_accepted_tokens"],
                                 "accepted": s["spec_accepted_tokens"] / drafted
                                 if drafted else None,
                                 "cached_share": s["cached_share"]})
                    print("%-16s c%-3d T%-4g %8.1f tok/s  %5.2fx  accepted %s" % (
                        name, c, t, tps, tps / base[(c, t)],
                        "%5.1f%%" % (100 * rows[-1]["accepted"]) if drafted else "    -"),
                        flush=True)
        finally:
            srv.terminate()
            srv.wait(timeout=60)

    print("\n| server | concurrency | temperature | output tok/s | vs plain | TPOT p50 ms "
          "| proposals accepted |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %s | %d | %g | %.1f | %.2fx | %.2f | %s |" % (
            r["config"], r["concurrency"], r["temperature"], r["output_tok_s"], r["vs_plain"],
            r["tpot_ms_p50"], "%.1f%%" % (100 * r["accepted"]) if r["accepted"] is not None
            else "-"))
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"config": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
