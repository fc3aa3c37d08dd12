#!/usr/bin/python3
"""`kvserve eval --task all` on the bundled model in CI-sized form: checks
its JSON document (model, policy, one result per task x length x depth with
samples and an accuracy in [0, 1]) and that dense attention still retrieves
the passkey at the shortest length (a quality regression check).  Then
each --scenario (SCBench's multi-turn and multi-request modes) on one short
length: a per-turn table and "scenario" JSON, and turns after the first
served mostly by the prefix cache, as the modes require.  Last, greedy
answers are the same with speculative decoding by the bundled draft model,
which has proposals accepted.

  check_eval.py KVSERVE WORKDIR [MODEL]
Exit 77 (skipped) when there is no bundled model.
"""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    kvserve, work = sys.argv[1], sys.argv[2]
    model = sys.argv[3] if len(sys.argv) > 3 else os.path.join(ROOT, "weights", "kvserve-main.gguf")
    if not os.path.exists(model):
        print("SKIP: no bundled model at %s" % model)
        return 77
    os.makedirs(work, exist_ok=True)
    out, plot = os.path.join(work, "eval.json"), os.path.join(work, "eval.svg")
    lengths, depths, samples = [256, 512], [0.0, 0.5, 1.0], 3
    cmd = [kvserve, "eval", "--model", model, "--task", "all", "--lengths",
           ",".join(map(str, lengths)), "--depths", ",".join(map(str, depths)), "--samples",
           str(samples), "--seed", "3", "--json", out, "--plot", plot]
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout)
    if r.returncode != 0:
        print("FAIL: exit %d\n%s" % (r.returncode, r.stderr))
        return 1
    doc = json.load(open(out))
    fails = []
    if doc.get("model") != model:
        fails.append("model is %r" % doc.get("model"))
    if doc.get("policy", {}).get("attention") != "dense":
        fails.append("policy lacks attention=dense: %r" % doc.get("policy"))
    res = doc.get("results", [])
    want = {(t, l, d) for t in ("passkey", "niah-multikey", "vt") for l in lengths for d in depths}
    got = {(x["task"], x["length"], x["depth"]) for x in res}
    if got != want:
        fails.append("results cover %d cells, expected %d" % (len(got), len(want)))
    for x in res:
        if x.get("samples") != samples or not (0.0 <= x.get("accuracy", -1) <= 1.0):
            fails.append("bad result %r" % x)
        # A byte a token: BOS and the length less the answer (" 12345").
        if x.get("prompt_tokens") != x["length"] - 5:
            fails.append("prompt_tokens %r at length %d, expected %d"
                         % (x.get("prompt_tokens"), x["length"], x["length"] - 5))
    pk = [x["accuracy"] for x in res if x["task"] == "passkey" and x["length"] == lengths[0]]
    if pk and sum(pk) / len(pk) < 0.6:
        fails.append("passkey accuracy at %d fell to %.2f" % (lengths[0], sum(pk) / len(pk)))
    if not open(plot).read().startswith("<svg"):
        fails.append("the plot is not an SVG")
    fails += check_scenarios(kvserve, model, work)
    fails += check_spec_draft(kvserve, model, work)
    for f in fails:
        print("FAIL: " + f)
    print("%d passed, %d failed" % (0 if fails else 1, 1 if fails else 0))
    return 1 if fails else 0


def check_scenarios(kvserve, model, work):
    fails = []
    for mode in ("multi-request", "multi-turn"):
        out = os.path.join(work, "scenario-%s.json" % mode)
        # 512 bytes hold three keys with their questions and answers.
        cmd = [kvserve, "eval", "--model", model, "--scenario", mode, "--lengths", "512",
               "--depths", "0.5", "--samples", "2", "--seed", "3", "--json", out]
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(r.stdout)
        if r.returncode != 0:
            fails.append("--scenario %s: exit %d\n%s" % (mode, r.returncode, r.stderr))
            continue
        if not all(w in r.stdout for w in (mode, "turn 1", "turn 3", "cached")):
            fails.append("--scenario %s: no per-turn table in the output" % mode)
        doc = json.load(open(out))
        sc = doc.get("scenario", {})
        rows = sc.get("lengths", [])
        if sc.get("mode") != mode or len(rows) != 1 or sc.get("task") != "niah-multikey":
            fails.append("--scenario %s: bad scenario object %r" % (mode, sc))
            continue
        row = rows[0]
        acc = row.get("turn_accuracy", [])
        if row.get("turns") != 3 or len(acc) != 3 or not all(0.0 <= a <= 1.0 for a in acc):
            fails.append("--scenario %s: bad per-turn accuracy %r" % (mode, row))
        # The context is not recomputed after the first turn.
        share = sc.get("cached_prompt_share")
        if share is None or share <= 0.5 or row.get("cached_prompt_share") != share:
            fails.append("--scenario %s: prefix cache served %r of later prompts" % (mode, share))
        if sc.get("kv_dropped_tokens") != 0:
            fails.append("--scenario %s: full KV dropped %r tokens" % (mode, sc.get("kv_dropped_tokens")))
        if [(x["task"], x["length"]) for x in doc.get("results", [])] != [("niah-multikey", 512)]:
            fails.append("--scenario %s: results %r" % (mode, doc.get("results")))
    r = subprocess.run([kvserve, "eval", "--model", model, "--scenario", "multi-turn", "--task",
                        "passkey"], capture_output=True, text=True)
    if r.returncode != 2 or "niah-multikey" not in r.stderr:
        fails.append("--scenario with --task passkey: exit %d, %r" % (r.returncode, r.stderr[:200]))
    return fails


def check_spec_draft(kvserve, model, work):
    draft = os.path.join(os.path.dirname(model), "kvserve-draft.gguf")
    if not os.path.exists(draft):
        return []
    acc, fails = [], []
    for extra in ([], ["--num-speculative-tokens", "4", "--speculative-method", "draft",
                       "--draft-model", draft]):
        out = os.path.join(work, "spec-draft-%d.json" % len(extra))
        cmd = [kvserve, "eval", "--model", model, "--task", "passkey", "--lengths", "256,512",
               "--depths", "0,0.5,1", "--samples", "2", "--seed", "5", "--json", out] + extra
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(r.stdout)
        if r.returncode != 0:
            return ["eval %s: exit %d\n%s" % (" ".join(extra), r.returncode, r.stderr)]
        acc.append([(x["length"], x["depth"], x["accuracy"]) for x in json.load(open(out))["results"]])
        if extra and not re.search(r"speculative decoding accepted [1-9][0-9]* of", r.stdout + r.stderr):
            fails.append("eval --speculative-method draft: no proposal accepted")
    if acc[0] != acc[1]:
        fails.append("eval --speculative-method draft changed the answers: %r vs %r" % tuple(acc))
    return fails


if __name__ == "__main__":
    sys.exit(main())
