#!/usr/bin/python3
"""Whether a long prompt's tokenizing stalls the other streams.

Starts `kvserve serve` (by default on a tiny random model with GPT-2's
byte-level BPE vocabulary, so tokenizing costs what it does for a real
model while decoding stays fast), runs one greedy
stream of --max-tokens tokens, and while it streams sends --requests
Generate calls with --text-mb MiB of prompt text each, one after another:
each is tokenized whole, then refused as longer than the model's context
(a small answer, so the client's own decoding does not disturb the
timing).  The server parses and tokenizes on libuv's thread pool, so the
stream's messages should keep their pace; tokenizing on the loop that
writes them would hold each message back for a whole tokenize.  Prints,
all from this one run:

  * each long request's latency (the time a loop-side tokenize would
    stall);
  * the stream's inter-message gaps: median outside the Tokenize window
    (the baseline) and the largest inside it;
  * the ratio of that largest gap to the median long-request latency (well
    below 1 when the loop is not blocked; 1 or more when it is).

Writes the figures to --json (default bench/out/stall.json).  Needs
Debian's python3-grpcio and protoc, as tests/integration/test_grpc.py.
Usage: bench/stall.py [--build build] [--model GGUF | --vocab GGUF]
                      [--kvserve PATH (another binary, for comparison)]
                      [--requests 6] [--text-mb 1] [--max-tokens 3000]
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_harness():
    path = os.path.join(ROOT, "tests", "integration", "test_grpc.py")
    spec = importlib.util.spec_from_file_location("kvs_stall_harness", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--kvserve", default=None)
    ap.add_argument("--vocab", default=os.path.join(ROOT, "..", "shared", "data", "vocab",
                                                   "ggml-vocab-gpt-2.gguf"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--text-mb", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=3000)
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "out", "stall.json"))
    a = ap.parse_args()
    h = load_harness()
    import grpc
    work = tempfile.mkdtemp(prefix="kvs-stall-")
    h.grpc = grpc
    h.pb, h.hpb = h.gen_protos(work)
    binary = a.kvserve or os.path.join(ROOT, a.build, "kvserve")
    model = a.model
    if model is None:
        # A tiny model with a real BPE vocabulary: tokenizing costs what it
        # does for a production model, decoding stays fast.
        model = os.path.join(work, "tiny-bpe.gguf")
        subprocess.run([binary, "model", "random", "--shape", "tiny", "--dtype", "f32",
                        "--vocab", a.vocab, "--out", model], check=True, capture_output=True)
    srv = h.start_server(binary, model, work, "stall",
                         flags=["--threads", "1", "--max-model-len", "32768"])
    try:
        ch = grpc.insecure_channel(srv.addr, options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)])
        api = h.Api(ch)
        words = ["the ", "quick ", "brown ", "fox, ", "jumps\n", "over ", "lazy ", "dogs. ",
                 "1234 ", "Stra\u00dfe "]
        text, k = [], 0
        size = int(a.text_mb * (1 << 20))
        n = 0
        while n < size:
            w = words[k % len(words)]
            text.append(w)
            n += len(w.encode())
            k = k * 7 + 3
        text = "".join(text)
        h.collect(api, h.greedy_req(text[:1000], 1), timeout=60)  # warm-up

        arrivals = []
        window = [None, None]
        tok_ms = []

        # Serialized once: the client's own work stays out of the window.
        long_req = h.greedy_req(text, 1).SerializeToString()

        def tokenize_all():
            window[0] = time.monotonic()
            for _ in range(a.requests):
                t0 = time.monotonic()
                try:
                    for _ in api.raw_generate(long_req, timeout=120):
                        pass
                    code = None
                except grpc.RpcError as e:
                    code = e.code()
                tok_ms.append((time.monotonic() - t0) * 1e3)
                if code != grpc.StatusCode.OUT_OF_RANGE:
                    raise RuntimeError("a long prompt ended with %s" % code)
            window[1] = time.monotonic()

        req = h.greedy_req(h.TEXT_PROMPT, a.max_tokens)
        th = None
        for msg in api.generate(req, timeout=300):
            arrivals.append(time.monotonic())
            if th is None and len(arrivals) >= 20:
                th = threading.Thread(target=tokenize_all)
                th.start()
        if th:
            th.join()
        if window[1] is None or window[1] > arrivals[-1]:
            print("stall: the stream ended before the long prompts; raise --max-tokens",
                  file=sys.stderr)
            return 1
        gaps_in, gaps_out = [], []
        for t0, t1 in zip(arrivals, arrivals[1:]):
            inside = t1 >= window[0] and t0 <= window[1]
            (gaps_in if inside else gaps_out).append((t1 - t0) * 1e3)
        med_out = statistics.median(gaps_out)
        max_in = max(gaps_in)
        med_tok = statistics.median(tok_ms)
        res = {"kvserve": binary, "model": model, "requests": a.requests, "text_bytes": len(text.encode()),
               "tokenize_ms": [round(x, 2) for x in tok_ms],
               "tokenize_ms_median": round(med_tok, 2),
               "gap_ms_median_outside": round(med_out, 3),
               "gap_ms_max_inside": round(max_in, 3),
               "gap_ms_median_inside": round(statistics.median(gaps_in), 3),
               "messages": len(arrivals),
               "max_gap_over_tokenize": round(max_in / med_tok, 4)}
        print("long prompts of %.1f MiB: %s ms (median %.1f)" % (
            len(text.encode()) / (1 << 20), ", ".join("%.1f" % x for x in tok_ms), med_tok))
        print("stream gaps: median %.2f ms outside the window (baseline), median %.2f and max "
              "%.2f ms inside" % (med_out, res["gap_ms_median_inside"], max_in))
        print("largest gap / median long request: %.3fx (>= 1: the loop was blocked)"
              % res["max_gap_over_tokenize"])
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print("json: %s" % a.json)
        return 0
    finally:
        srv.kill()


if __name__ == "__main__":
    sys.exit(main())
