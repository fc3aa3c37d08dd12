#!/usr/bin/python3
"""`kvserve eval --task all` on the bundled model in CI-sized form: checks
its JSON document (model, policy, one result per task x length x depth with
samples and an accuracy in [0, 1]) and that dense attention still retrieves
the passkey at the shortest length (a quality regression check).

  check_eval.py KVSERVE WORKDIR [MODEL]
Exit 77 (skipped) when there is no bundled model.
"""
import json
import os
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
    pk = [x["accuracy"] for x in res if x["task"] == "passkey" and x["length"] == lengths[0]]
    if pk and sum(pk) / len(pk) < 0.6:
        fails.append("passkey accuracy at %d fell to %.2f" % (lengths[0], sum(pk) / len(pk)))
    if not open(plot).read().startswith("<svg"):
        fails.append("the plot is not an SVG")
    for f in fails:
        print("FAIL: " + f)
    print("%d passed, %d failed" % (0 if fails else 1, 1 if fails else 0))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
