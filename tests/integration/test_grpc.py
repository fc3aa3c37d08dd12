#!/usr/bin/python3
"""kvserve's gRPC API end to end: the real `kvserve serve` on a loopback port,
driven by three independent client stacks (Python grpcio, the project's C
client `kvserve generate`, Node @grpc/grpc-js), against the contract of
proto/kvserve/v1/kvserve.proto and the server's documented behaviour.

  test_grpc.py KVSERVE WORKDIR [MODEL]

Run with Debian's /usr/bin/python3 (python3-grpcio, python3-protobuf).  The
Python message modules are generated with `protoc --python_out` into WORKDIR;
no grpc_tools.  Prints one PASS/FAIL/SKIP line per check.
Exit 0: all passed; 1: a check failed; 77: skipped (grpcio, protoc or the
model missing).

Checks:
  0. model/server information and Tokenize agree with the flags and `run`
  1. greedy tokens: Python, C client and Node == `kvserve run --json`
  2. 64 concurrent streams == their solo outputs
  3. client cancel and deadline expiry free every KV block
  4. Abort by request_id -> CANCELLED; unknown id -> found=false
  5. health Check/Watch; SIGTERM drain (in-flight OK, new UNAVAILABLE, exit 0)
  6. bad requests get the right status; the server keeps serving
  7. --api-key-file: UNAUTHENTICATED without/with a wrong key; health open
  8. TLS: a TLS client works, a plaintext one gets UNAVAILABLE
  9. --metrics-port: GET /metrics counts what the test sent, histograms are
     consistent, 404/405 elsewhere; `promtool check metrics` passes and
     Debian's Prometheus scrapes the server (both required when CI is set)
 10. `kvserve bench`: closed and open loop runs succeed and their JSON
     records agree with the summary; multi-turn conversations reuse their
     history; injected cancellations and deadlines end as intended and the
     plot is written; per-request policy flags reach the server; a bad
     flag exits 2
Also: the server starts with default engine flags (0), and a full queue
answers RESOURCE_EXHAUSTED (6).
"""
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "proto")
NODE_DIR = os.path.join(ROOT, "tests", "node")

# Engine flags shared by every server and by `kvserve run` where it has them.
MAX_MODEL_LEN = 2048   # the long generations of checks 3-5 need room
BLOCK_SIZE = 16
ENGINE_FLAGS = ["--threads", "1", "--max-model-len", str(MAX_MODEL_LEN),
                "--block-size", str(BLOCK_SIZE), "--kv-cache-dtype", "f16"]
SERVER_FLAGS = ENGINE_FLAGS + ["--num-kv-blocks", "1024", "--max-num-seqs", "64",
                               "--max-queued-requests", "256", "--drain-timeout", "120"]
GREEDY_MAX_TOKENS = 24
LONG_MAX_TOKENS = MAX_MODEL_LEN - 64   # a generation that runs for a while
# Streams in flight at SIGTERM: long enough to still run when the signal
# lands, short enough to drain well inside --drain-timeout in a sanitizer
# build (about 40 tokens/s per stream there).
DRAIN_MAX_TOKENS = 512
TOTAL_BUDGET_S = 270                  # ctest's TIMEOUT is 300

pb = None       # kvserve.v1 messages
hpb = None      # grpc.health.v1 messages
grpc = None

results = []    # (name, ok, detail)


def report(name, ok, detail=""):
    results.append((name, ok, detail))
    line = "%s: %s" % ("PASS" if ok else "FAIL", name)
    if detail:
        line += " -- " + detail
    print(line, flush=True)
    return ok


def skip(name, why):
    print("SKIP: %s -- %s" % (name, why), flush=True)


# --------------------------------------------------------------------------
# Setup: generated modules, the server process


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def gen_protos(work):
    """protoc --python_out into WORKDIR/gen.  The modules are loaded by file
    path: a generated 'grpc/' package on sys.path would shadow grpcio."""
    out = os.path.join(work, "gen")
    os.makedirs(out, exist_ok=True)
    r = subprocess.run(["protoc", "-I", PROTO_DIR, "--python_out=" + out,
                        "kvserve/v1/kvserve.proto", "grpc/health/v1/health.proto"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("protoc failed: %s" % r.stderr.strip())
    k = load_module("kvs_it_kvserve_pb2", os.path.join(out, "kvserve", "v1", "kvserve_pb2.py"))
    h = load_module("kvs_it_health_pb2", os.path.join(out, "grpc", "health", "v1", "health_pb2.py"))
    return k, h


class Server:
    """One `kvserve serve` process on 127.0.0.1:<free port>."""

    def __init__(self, kvserve, model, work, name, extra=(), flags=None):
        self.name = name
        self.log_path = os.path.join(work, name + ".log")
        self.log = open(self.log_path, "wb")
        cmd = [kvserve, "serve", "--model", model, "--host", "127.0.0.1", "--port", "0"]
        cmd += (SERVER_FLAGS if flags is None else list(flags)) + list(extra)
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log,
                                     stdin=subprocess.DEVNULL)
        self.port = None
        self.metrics_port = None
        self.lines = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def wait_ready(self, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=max(0.05, end - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError("%s exited (rc=%s) before listening; stderr:\n%s"
                                   % (self.name, self.proc.wait(), self.log_tail()))
            # --metrics-port prints its line first.
            mpre = "kvserve: metrics on 127.0.0.1:"
            if line.startswith(mpre) and line[len(mpre):].isdigit():
                self.metrics_port = int(line[len(mpre):])
                continue
            pre = "kvserve: listening on 127.0.0.1:"
            if line.startswith(pre) and line[len(pre):].isdigit():
                self.port = int(line[len(pre):])
                return self.port
            raise RuntimeError("%s printed an unexpected stdout line %r" % (self.name, line))
        raise RuntimeError("%s printed no listening line within %ds; stderr:\n%s"
                           % (self.name, timeout, self.log_tail()))

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def log_tail(self, n=15):
        try:
            self.log.flush()
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join("    " + x for x in lines[-n:])
        except OSError:
            return ""

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()


SERVERS = []
OTHERS = []  # other processes a test runs (Prometheus), for the watchdog


def start_server(kvserve, model, work, name, extra=(), flags=None):
    s = Server(kvserve, model, work, name, extra, flags)
    SERVERS.append(s)
    s.wait_ready()
    return s


# --------------------------------------------------------------------------
# Python client helpers


class Api:
    def __init__(self, channel, metadata=None):
        self.ch = channel
        self.md = list(metadata or [])

        def us(path, req, resp):
            return channel.unary_stream(path, request_serializer=req.SerializeToString,
                                        response_deserializer=resp.FromString)

        def uu(path, req, resp):
            return channel.unary_unary(path, request_serializer=req.SerializeToString,
                                       response_deserializer=resp.FromString)
        self.generate = us("/kvserve.v1.Generation/Generate", pb.GenerateRequest,
                           pb.GenerateResponse)
        self.tokenize = uu("/kvserve.v1.Generation/Tokenize", pb.TokenizeRequest,
                           pb.TokenizeResponse)
        self.model_info = uu("/kvserve.v1.Generation/GetModelInfo", pb.GetModelInfoRequest,
                             pb.ModelInfo)
        self.server_info = uu("/kvserve.v1.Control/GetServerInfo", pb.GetServerInfoRequest,
                              pb.ServerInfo)
        self.get_load = uu("/kvserve.v1.Control/GetLoad", pb.GetLoadRequest, pb.Load)
        self.abort = uu("/kvserve.v1.Control/Abort", pb.AbortRequest, pb.AbortResponse)
        self.check = uu("/grpc.health.v1.Health/Check", hpb.HealthCheckRequest,
                        hpb.HealthCheckResponse)
        self.watch = us("/grpc.health.v1.Health/Watch", hpb.HealthCheckRequest,
                        hpb.HealthCheckResponse)
        # No serializers: bytes in, bytes out.
        self.raw_generate = channel.unary_stream("/kvserve.v1.Generation/Generate")

    def load(self, timeout=5):
        return self.get_load(pb.GetLoadRequest(), timeout=timeout, metadata=self.md)


def code_name(code):
    return code.name if code is not None else "OK"


def collect(api, req, timeout=60, metadata=None, raw=False):
    """Runs one Generate to its end.  Returns a dict: code (grpc.StatusCode or
    None for OK), details, tokens, text, finish, request_id, messages."""
    out = {"code": None, "details": "", "tokens": [], "text": "", "finish": None,
           "request_id": None, "messages": 0, "usage": None, "logprobs": [],
           "prompt_logprobs": []}
    md = api.md if metadata is None else metadata
    call = (api.raw_generate if raw else api.generate)(req, timeout=timeout, metadata=md)
    try:
        for r in call:
            out["messages"] += 1
            if raw:
                continue
            if r.HasField("request_id") and out["request_id"] is None:
                out["request_id"] = r.request_id
            out["tokens"].extend(r.token_ids)
            out["logprobs"].extend(r.logprobs)
            out["prompt_logprobs"].extend(r.prompt_logprobs)
            out["text"] += r.text
            if r.HasField("finish_reason"):
                out["finish"] = r.finish_reason
            if r.HasField("usage"):
                out["usage"] = r.usage
    except grpc.RpcError as e:
        out["code"], out["details"] = e.code(), e.details()
    return out


def finish_name(f):
    return pb.FinishReason.Name(f) if f is not None else "none"


def greedy_req(prompt, max_tokens=GREEDY_MAX_TOKENS, **kw):
    req = pb.GenerateRequest(**kw)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.tokens.ids.extend(prompt)
    req.sampling.temperature = 0.0
    req.sampling.max_tokens = max_tokens
    req.sampling.ignore_eos = True
    return req


def describe(out):
    s = "status %s" % code_name(out["code"])
    if out["details"]:
        s += " %r" % out["details"][:200]
    return s + ", %d tokens, finish %s" % (len(out["tokens"]), finish_name(out["finish"]))


def wait_idle(api, timeout=2.5):
    """Polls GetLoad until every KV block is free and nothing runs or waits.
    Returns (ok, last Load or error text)."""
    end = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = api.load()
            if (last.kv_blocks_free == last.kv_blocks_total and last.kv_blocks_total > 0
                    and last.running == 0 and last.queued == 0):
                return True, last
        except grpc.RpcError as e:
            last = "GetLoad failed: %s %s" % (e.code().name, e.details())
        if time.monotonic() >= end:
            return False, last
        time.sleep(0.05)


def load_str(ld):
    if isinstance(ld, str):
        return ld
    return ("running=%d queued=%d kv_blocks_free=%d kv_blocks_total=%d cached=%d"
            % (ld.running, ld.queued, ld.kv_blocks_free, ld.kv_blocks_total,
               ld.kv_blocks_cached))


# --------------------------------------------------------------------------
# Reference and the other client stacks


def run_reference(kvserve, model, prompt, max_tokens=GREEDY_MAX_TOKENS):
    cmd = [kvserve, "run", "--model", model, "--temperature", "0", "--ignore-eos",
           "--max-tokens", str(max_tokens), "--json"] + ENGINE_FLAGS
    cmd += (["--prompt", prompt] if isinstance(prompt, str)
            else ["--prompt-tokens", ",".join(map(str, prompt))])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("kvserve run exit %d: %s" % (r.returncode, r.stderr.strip()[-300:]))
    return json.loads(r.stdout)


def c_client(kvserve, addr, prompt, max_tokens=GREEDY_MAX_TOKENS, extra=()):
    cmd = [kvserve, "generate", "--addr", addr, "--temperature", "0", "--ignore-eos",
           "--max-tokens", str(max_tokens), "--json", "--timeout-ms", "30000"] + list(extra)
    cmd += (["--prompt", prompt] if isinstance(prompt, str)
            else ["--prompt-tokens", ",".join(map(str, prompt))])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return None, "exit %d: %s %s" % (r.returncode, r.stdout.strip()[-200:],
                                         r.stderr.strip()[-300:])
    try:
        doc = json.loads(r.stdout.strip().splitlines()[-1])
        return doc.get("tokens"), doc
    except (ValueError, IndexError) as e:
        return None, "unparsable JSON (%s): %r" % (e, r.stdout[-300:])


def node_available():
    if shutil.which("node") is None:
        return "node is not installed"
    for m in ("@grpc/grpc-js", "@grpc/proto-loader"):
        if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", *m.split("/"))):
            return "tests/node/node_modules lacks %s (run scripts/setup.sh or npm ci there)" % m
    return None


def node_client(addr, prompt, max_tokens=GREEDY_MAX_TOKENS):
    req = {"sampling": {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}}
    if isinstance(prompt, str):
        req["text"] = prompt
    else:
        req["tokens"] = {"ids": list(prompt)}
    r = subprocess.run(["node", os.path.join(NODE_DIR, "client.js"), addr, json.dumps(req),
                        "--timeout-ms", "30000"], capture_output=True, text=True, timeout=60)
    try:
        doc = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, "exit %d, no JSON: %s %s" % (r.returncode, r.stdout[-200:], r.stderr[-300:])
    if doc.get("status") != 0:
        return None, "status %s %r" % (doc.get("status"), doc.get("details"))
    return doc.get("tokens"), doc


# --------------------------------------------------------------------------
# The checks

TOKEN_PROMPT = [256, 84, 104, 101, 32, 115, 107, 121, 32, 105, 115]   # BOS "The sky is"
TEXT_PROMPT = "The grass is"


def check_info(api, model):
    try:
        mi = api.model_info(pb.GetModelInfoRequest(), timeout=5)
        si = api.server_info(pb.GetServerInfoRequest(), timeout=5)
    except grpc.RpcError as e:
        return report("0 info: GetModelInfo/GetServerInfo", False,
                      "%s %s" % (e.code().name, e.details()))
    bad = []
    if not mi.n_vocab or not mi.n_layer:
        bad.append("ModelInfo lacks n_vocab/n_layer: %s" % str(mi).replace("\n", " "))
    if si.block_size != BLOCK_SIZE:
        bad.append("block_size %d != %d" % (si.block_size, BLOCK_SIZE))
    if si.max_model_len != MAX_MODEL_LEN:
        bad.append("max_model_len %d != %d" % (si.max_model_len, MAX_MODEL_LEN))
    if si.kv_cache_dtype.lower() != "f16":
        bad.append("kv_cache_dtype %r != f16" % si.kv_cache_dtype)
    if si.max_num_seqs != 64 or si.max_queued_requests != 256:
        bad.append("max_num_seqs/max_queued_requests %d/%d != 64/256"
                   % (si.max_num_seqs, si.max_queued_requests))
    if si.total_blocks != 1024:
        bad.append("total_blocks %d != --num-kv-blocks 1024" % si.total_blocks)
    want = ["dense", "sink-window", "delta", "block-sparse", "quest-decode"]
    if list(si.attention_policies) != want:
        bad.append("attention_policies %s != %s" % (list(si.attention_policies), want))
    report("0 info: GetModelInfo/GetServerInfo reflect the model and flags", not bad,
           "; ".join(bad) or "%s, vocab %d, %s" % (mi.name, mi.n_vocab, si.version))
    return mi


def check_tokenize(api, ref_text):
    try:
        t = api.tokenize(pb.TokenizeRequest(text=TEXT_PROMPT), timeout=5)
    except grpc.RpcError as e:
        return report("0 info: Tokenize", False, "%s %s" % (e.code().name, e.details()))
    n = len(t.ids)
    report("0 info: Tokenize(text) has as many ids as `run` counted", n == ref_text["prompt_tokens"],
           "Tokenize gave %d ids %s, run counted %d" % (n, list(t.ids), ref_text["prompt_tokens"]))
    # No text at all (protobuf-c leaves the string NULL): the empty text.
    try:
        unset = list(api.tokenize(pb.TokenizeRequest(), timeout=5).ids)
        empty = list(api.tokenize(pb.TokenizeRequest(text=""), timeout=5).ids)
        report("0 info: Tokenize without text == Tokenize(\"\")", unset == empty,
               "%s vs %s" % (unset, empty))
    except grpc.RpcError as e:
        report("0 info: Tokenize without text == Tokenize(\"\")", False,
               "%s %s" % (e.code().name, e.details()))


def check_greedy(api, kvserve, model, addr):
    node_why = node_available()
    refs = {}
    for label, prompt in (("token ids", TOKEN_PROMPT), ("text", TEXT_PROMPT)):
        try:
            ref = run_reference(kvserve, model, prompt)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
            report("1 greedy %s: `kvserve run --json` reference" % label, False, str(e))
            continue
        refs[label] = ref
        want = ref["tokens"]
        py = collect(api, greedy_req(prompt))
        ok = py["code"] is None and py["tokens"] == want
        if ok and py["finish"] != pb.FINISH_REASON_LENGTH:
            ok = False
        if ok and py["request_id"] in (None, ""):
            ok = False
        report("1 greedy %s: Python grpcio == run" % label, ok,
               "" if ok else "%s, request_id %r; got %s, want %s"
               % (describe(py), py["request_id"], py["tokens"], want))
        if ok and isinstance(prompt, str) and py["text"] != ref["text"]:
            report("1 greedy %s: streamed text == run's text" % label, False,
                   "got %r, want %r" % (py["text"], ref["text"]))
        if py["usage"] is not None:
            u = py["usage"]
            uok = (u.prompt_tokens == ref["prompt_tokens"]
                   and u.completion_tokens == GREEDY_MAX_TOKENS)
            report("1 greedy %s: usage counts" % label, uok,
                   "prompt_tokens %d (run: %d), completion_tokens %d (want %d)"
                   % (u.prompt_tokens, ref["prompt_tokens"], u.completion_tokens,
                      GREEDY_MAX_TOKENS))
        else:
            report("1 greedy %s: usage counts" % label, False, "the last message has no usage")
        got, info = c_client(kvserve, addr, prompt)
        report("1 greedy %s: C client (kvserve generate --json) == run" % label, got == want,
               "" if got == want else "got %s, want %s (%s)" % (got, want, info))
        if node_why:
            skip("1 greedy %s: Node @grpc/grpc-js == run" % label, node_why)
        else:
            got, info = node_client(addr, prompt)
            report("1 greedy %s: Node @grpc/grpc-js == run" % label, got == want,
                   "" if got == want else "got %s, want %s (%s)" % (got, want, info))
    return refs


def check_logprobs(api, kvserve, model, work, addr):
    """sampling.logprobs against the logits `kvserve run --logits-out`
    writes for the same greedy run: each token's log-softmax, and the most
    likely tokens in order (ties by id); the C client prints them too."""
    name = "1 logprobs: the log-softmax of run's logits, top 5 in order"
    try:
        import numpy as np
    except ImportError:
        skip(name, "numpy missing (Debian: python3-numpy)")
        return
    n = 8
    npy = os.path.join(work, "logprobs-ref.npy")
    cmd = [kvserve, "run", "--model", model, "--temperature", "0", "--ignore-eos",
           "--max-tokens", str(n), "--json", "--logits-out", npy,
           "--prompt-tokens", ",".join(map(str, TOKEN_PROMPT))] + ENGINE_FLAGS
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        report(name, False, "kvserve run exit %d: %s" % (r.returncode, r.stderr[-300:]))
        return
    ref = json.loads(r.stdout)["tokens"]
    rows = np.load(npy).astype(np.float64)
    req = greedy_req(TOKEN_PROMPT, n)
    req.sampling.logprobs = 5
    o = collect(api, req)
    problems = []
    if o["code"] is not None or o["tokens"] != ref or len(o["logprobs"]) != n:
        problems.append("%s, tokens %s (run: %s), %d logprobs"
                        % (describe(o), o["tokens"], ref, len(o["logprobs"])))
    for i, (tok, lp) in enumerate(zip(o["tokens"], o["logprobs"])):
        row = rows[i]
        ls = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
        order = sorted(range(len(row)), key=lambda v: (-row[v], v))[:5]
        if abs(lp.logprob - ls[tok]) > 1e-4:
            problems.append("token %d: logprob %.6f, want %.6f" % (i, lp.logprob, ls[tok]))
        if list(lp.top_ids) != order:
            problems.append("token %d: top %s, want %s" % (i, list(lp.top_ids), order))
        elif max(abs(a - ls[v]) for a, v in zip(lp.top_logprobs, order)) > 1e-4:
            problems.append("token %d: top logprobs %s" % (i, list(lp.top_logprobs)))
    report(name, not problems, "; ".join(problems[:3]))
    plain = collect(api, greedy_req(TOKEN_PROMPT, 4))
    report("1 logprobs: none unless asked", plain["code"] is None and not plain["logprobs"],
           describe(plain))
    got = subprocess.run([kvserve, "generate", "--addr", addr, "--temperature", "0",
                          "--ignore-eos", "--max-tokens", "4", "--json", "--logprobs", "2",
                          "--prompt-tokens", ",".join(map(str, TOKEN_PROMPT))],
                         capture_output=True, text=True, timeout=60)
    try:
        doc = json.loads(got.stdout)
        lps = doc["logprobs"]
        ok = (len(lps) == 4 and all(len(t["top"]) == 2 for t in lps)
              and abs(lps[0]["logprob"] - o["logprobs"][0].logprob) < 1e-6
              and lps[0]["top"][0][0] == o["logprobs"][0].top_ids[0])
        detail = "" if ok else got.stdout[:300]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        ok, detail = False, "%s: %s %s" % (e, got.stdout[:200], got.stderr[-200:])
    report("1 logprobs: kvserve generate --logprobs 2 --json", ok, detail)
    # forced_tokens: the greedy tokens forced give their logprobs back
    # exactly; others come out as given, scored; EOS among them does not
    # end the request; max_tokens defaults to their count.
    req = pb.GenerateRequest()
    req.tokens.ids.extend(TOKEN_PROMPT)
    req.forced_tokens.ids.extend(o["tokens"])
    req.sampling.logprobs = 5
    f = collect(api, req)
    same = (f["code"] is None and f["tokens"] == o["tokens"]
            and [x.logprob for x in f["logprobs"]] == [x.logprob for x in o["logprobs"]]
            and [list(x.top_ids) for x in f["logprobs"]] == [list(x.top_ids) for x in o["logprobs"]])
    report("1 forced_tokens: the greedy tokens forced -> the same logprobs", same,
           "%s; %s vs %s" % (describe(f), [x.logprob for x in f["logprobs"]][:3],
                             [x.logprob for x in o["logprobs"]][:3]))
    eos = 257
    other = [72, 105, eos, 33]
    req = pb.GenerateRequest()
    req.tokens.ids.extend(TOKEN_PROMPT)
    req.forced_tokens.ids.extend(other)
    req.sampling.max_tokens = 6
    req.sampling.temperature = 0.0  # the sampled tail: deterministic
    g = collect(api, req)
    report("1 forced_tokens: others (EOS among them) come out as given, scored, then sampling",
           g["code"] is None and g["tokens"][:4] == other and len(g["tokens"]) == 6
           and len(g["logprobs"]) == 6 and all(x.logprob <= 0 for x in g["logprobs"]),
           "%s: %s" % (describe(g), g["tokens"]))
    # A forced token is never a stop: not a stop id, nor the end of a stop
    # string; those are looked for in the sampled tokens only.
    req.sampling.stop_token_ids.append(105)
    req.sampling.stop.append("Hi")
    req.sampling.max_tokens = 4
    h = collect(api, req)
    report("1 forced_tokens: a stop id or stop string among them does not end the output",
           h["code"] is None and h["tokens"] == other and h["finish"] == pb.FINISH_REASON_LENGTH
           and h["text"].startswith("Hi"), "%s: %s %r" % (describe(h), h["tokens"], h["text"]))


def check_min_tokens(api):
    """min_tokens: a stop token id that would end the output at once is
    banned for the first min_tokens tokens, so the output runs on."""
    first = collect(api, greedy_req(TOKEN_PROMPT, 4))
    name = "1 min_tokens: the stop id is not generated before min_tokens"
    if first["code"] is not None or not first["tokens"]:
        report(name, False, describe(first))
        return
    stop = first["tokens"][0]
    req = greedy_req(TOKEN_PROMPT, 8)
    req.sampling.ignore_eos = False
    req.sampling.stop_token_ids.append(stop)
    at_once = collect(api, req)
    req.sampling.min_tokens = 5
    held = collect(api, req)
    report(name, at_once["code"] is None and at_once["tokens"] == []
           and at_once["finish"] == pb.FINISH_REASON_STOP and held["code"] is None
           and len(held["tokens"]) >= 5 and stop not in held["tokens"][:5],
           "stop id %d: without %s %s; with min_tokens 5: %s %s"
           % (stop, describe(at_once), at_once["tokens"], describe(held), held["tokens"]))


def check_penalties(api, kvserve, model):
    """Repetition, presence and frequency penalties: the server's greedy
    tokens equal `kvserve run`'s with the same flags (the penalty math is
    checked in test_model and test_sched), and differ from the greedy
    tokens without them."""
    n = 16
    flags = ["--repetition-penalty", "1.8", "--presence-penalty", "0.5",
             "--frequency-penalty", "1.0"]
    cmd = [kvserve, "run", "--model", model, "--temperature", "0", "--ignore-eos",
           "--max-tokens", str(n), "--json", "--prompt", TEXT_PROMPT] + ENGINE_FLAGS + flags
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    name = "1 penalties: greedy with repetition/presence/frequency == run's, != without"
    if r.returncode != 0:
        report(name, False, "kvserve run exit %d: %s" % (r.returncode, r.stderr[-300:]))
        return
    want = json.loads(r.stdout)["tokens"]
    req = greedy_req(TEXT_PROMPT, n)
    req.sampling.repetition_penalty = 1.8
    req.sampling.presence_penalty = 0.5
    req.sampling.frequency_penalty = 1.0
    o = collect(api, req)
    plain = collect(api, greedy_req(TEXT_PROMPT, n))
    report(name, o["code"] is None and o["tokens"] == want and plain["tokens"] != want,
           "%s: %s, run: %s, without: %s" % (describe(o), o["tokens"], want, plain["tokens"]))


M64 = (1 << 64) - 1


def mix64(z):
    """base/kvs.h's kvs_mix64 (the splitmix64 finalizer)."""
    z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & M64
    z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M64
    return z ^ (z >> 31)


def sample_seed(seed, i):
    """sched.h's sched_sample_seed: the seed output i of sampling.n draws with."""
    return seed if i == 0 else mix64(seed ^ mix64(0x6e5eed + i))


def collect_samples(api, req, n, timeout=60, abort_after=0):
    """Runs a Generate of n outputs.  Returns (outputs, error): per index its
    tokens, text, finish and usage; error names a broken stream contract (a
    message for an unknown index or after its output's last, an output
    without one, a bad status).  abort_after: Abort after that many
    messages."""
    outs = [{"tokens": [], "text": "", "finish": None, "usage": None} for _ in range(n)]
    err, rid, msgs = "", None, 0
    call = api.generate(req, timeout=timeout, metadata=api.md)
    try:
        for r in call:
            msgs += 1
            if r.HasField("request_id") and rid is None:
                rid = r.request_id
            if abort_after and msgs == abort_after:
                api.abort(pb.AbortRequest(request_id=rid), timeout=5, metadata=api.md)
            i = r.index
            if i >= n or (n > 1 and not r.HasField("index")):
                err = err or "message for index %d (has_index %s)" % (i, r.HasField("index"))
                continue
            o = outs[i]
            if o["finish"] is not None:
                err = err or "a message for output %d after its last" % i
            o["tokens"].extend(r.token_ids)
            o["text"] += r.text
            if r.HasField("finish_reason"):
                o["finish"] = r.finish_reason
                o["usage"] = r.usage if r.HasField("usage") else None
                if o["usage"] is None:
                    err = err or "output %d's last message carries no usage" % i
    except grpc.RpcError as e:
        err = err or "status %s %s" % (e.code().name, e.details())
    for i, o in enumerate(outs):
        if o["finish"] is None:
            err = err or "output %d never finished" % i
    return outs, err


def check_samples(api, kvserve, addr):
    """sampling.n: output i equals a request of its own with seed
    sample_seed(seed, i); a stop string ends only the outputs it matches;
    Abort ends every output; bad n is refused naming the field; the C
    client prints every output."""
    n, seed, max_tokens = 4, 20261130, 14

    def req_of(k, sd, stop=None):
        req = pb.GenerateRequest(text=TEXT_PROMPT)
        req.sampling.temperature = 1.3  # the bundled model is sure of itself
        req.sampling.seed = sd
        req.sampling.max_tokens = max_tokens
        req.sampling.ignore_eos = True
        if k != 1:
            req.sampling.n = k
        if stop:
            req.sampling.stop.append(stop)
        return req

    alone = [collect(api, req_of(1, sample_seed(seed, i))) for i in range(n)]
    outs, err = collect_samples(api, req_of(n, seed), n)
    name = "1 sampling.n 4: output i == a request alone with its seed, one last message each"
    bad = [i for i in range(n) if outs[i]["tokens"] != alone[i]["tokens"]
           or outs[i]["finish"] != pb.FINISH_REASON_LENGTH
           or outs[i]["usage"].completion_tokens != max_tokens]
    distinct = len({tuple(a["tokens"]) for a in alone})
    report(name, not err and not bad and distinct > 1,
           err or "mismatched outputs %s; %d distinct; got %s, alone %s"
           % (bad, distinct, [o["tokens"] for o in outs], [a["tokens"] for a in alone]))

    # A stop string taken from output 1: it ends there, and wherever else
    # it occurs, each output on its own.
    texts = [a["text"] for a in alone]
    stop = texts[1][2:4] if len(texts[1]) >= 4 else None
    if stop:
        outs, err = collect_samples(api, req_of(n, seed, stop), n)
        bad = []
        for i in range(n):
            at = texts[i].find(stop)
            want = (texts[i][:at], pb.FINISH_REASON_STOP) if at >= 0 else \
                (texts[i], pb.FINISH_REASON_LENGTH)
            if (outs[i]["text"], outs[i]["finish"]) != want:
                bad.append((i, outs[i]["text"], finish_name(outs[i]["finish"]), want[0]))
        report("1 sampling.n 4 with a stop string: each output stops on its own", not err
               and not bad, err or "stop %r: %s" % (stop, bad))

    req = req_of(3, seed)
    req.sampling.max_tokens = LONG_MAX_TOKENS
    outs, err = collect_samples(api, req, 3, abort_after=2)
    report("4 Abort of a request of 3 outputs ends each CANCELLED", not err and all(
        o["finish"] == pb.FINISH_REASON_CANCELLED and len(o["tokens"]) < LONG_MAX_TOKENS
        for o in outs), err or str([(finish_name(o["finish"]), len(o["tokens"])) for o in outs]))
    idle, ld = wait_idle(api)
    report("4 after it every KV block is free", idle, load_str(ld))

    for k in (0, 65):
        o = collect(api, req_of(k, seed))
        report("3 sampling.n %d -> INVALID_ARGUMENT naming sampling.n" % k,
               o["code"] == grpc.StatusCode.INVALID_ARGUMENT and "sampling.n" in o["details"],
               describe(o))

    toks, doc = c_client(kvserve, addr, TEXT_PROMPT, max_tokens,
                         ["--temperature", "1.3", "--seed", str(seed), "--n", str(n)])
    got = [o.get("tokens") for o in doc.get("outputs", [])] if isinstance(doc, dict) else doc
    report("1 kvserve generate --n 4 --json: every output, as the server sends it",
           got == [a["tokens"] for a in alone], str(got)[:300])


def check_logit_bias(api, kvserve, addr):
    """logit_bias: -100 on the greedy first token moves the output off it,
    +100 on a token makes greedy repeat it while logprobs stay the model's
    (the first one unlikely: the model copies it once it is there);
    kvserve run and kvserve generate agree; bad entries are refused naming
    the entry."""
    n = 6
    plain = collect(api, greedy_req(TEXT_PROMPT, n))
    name = "1 logit_bias: -100 moves greedy off its token, +100 forces one, logprobs unbiased"
    if plain["code"] is not None or not plain["tokens"]:
        report(name, False, describe(plain))
        return
    first = plain["tokens"][0]
    req = greedy_req(TEXT_PROMPT, n)
    req.sampling.logit_bias.add(token_id=first, bias=-100.0)
    off = collect(api, req)
    forced_tok = 113  # 'q': unlikely after the prompt
    req = greedy_req(TEXT_PROMPT, n)
    req.sampling.logit_bias.add(token_id=forced_tok, bias=100.0)
    req.sampling.logprobs = 1
    on = collect(api, req)
    lps = [lp.logprob for lp in on["logprobs"]]
    report(name, off["code"] is None and off["tokens"] and off["tokens"][0] != first
           and on["tokens"] == [forced_tok] * n and len(lps) == n and lps[0] < -5.0,
           "plain %s; -100 on %d: %s; +100 on %d: %s logprobs %s"
           % (plain["tokens"], first, off["tokens"], forced_tok, on["tokens"],
              ["%.2f" % x for x in lps]))
    toks, doc = c_client(kvserve, addr, TEXT_PROMPT, n, ["--logit-bias", "%d:-100" % first])
    r = subprocess.run([kvserve, "run", "--prompt", TEXT_PROMPT, "--temperature", "0",
                        "--ignore-eos", "--max-tokens", str(n), "--json", "--logit-bias",
                        "%d:-100" % first] + ENGINE_FLAGS, capture_output=True, text=True,
                       timeout=60)
    run_toks = json.loads(r.stdout)["tokens"] if r.returncode == 0 else r.stderr[-200:]
    report("1 kvserve generate / run --logit-bias: the server's tokens", toks == off["tokens"]
           and run_toks == off["tokens"], "generate %s, run %s, server %s"
           % (toks, run_toks, off["tokens"]))
    for entry, field in (({"token_id": 100000, "bias": 1.0}, "logit_bias[0].token_id"),
                         ({"token_id": 5, "bias": 100.5}, "logit_bias[0].bias"),
                         ({"bias": 1.0}, "logit_bias[0].token_id"),
                         ({"token_id": 5}, "logit_bias[0].bias: required")):
        req = greedy_req(TEXT_PROMPT, 2)
        req.sampling.logit_bias.add(**entry)
        o = collect(api, req)
        report("3 logit_bias %s -> INVALID_ARGUMENT naming %s" % (entry, field),
               o["code"] == grpc.StatusCode.INVALID_ARGUMENT and field in o["details"],
               describe(o))


def check_prompt_logprobs(api, kvserve, addr):
    """prompt_logprobs: one entry per prompt token after the first, equal to
    the logprobs and top ids of the same tokens teacher-forced after the
    first; the prefix cache does not skip them; refused with speculative
    prefill and above 20; the C client prints the server's."""
    ids = list(api.tokenize(pb.TokenizeRequest(text=TEXT_PROMPT), timeout=5).ids)
    req = greedy_req(TEXT_PROMPT, 2)
    req.sampling.prompt_logprobs = 3
    a = collect(api, req)
    b = collect(api, req)  # the prompt is in the prefix cache now
    forced = greedy_req(ids[:1], len(ids) - 1)
    forced.forced_tokens.ids.extend(ids[1:])
    forced.sampling.logprobs = 3
    f = collect(api, forced)

    def diff(x, y):
        if len(x) != len(y):
            return "lengths %d vs %d" % (len(x), len(y))
        for i, (p, q) in enumerate(zip(x, y)):
            if abs(p.logprob - q.logprob) > 1e-4 or list(p.top_ids) != list(q.top_ids):
                return "entry %d: %.6f %s vs %.6f %s" % (i, p.logprob, list(p.top_ids),
                                                         q.logprob, list(q.top_ids))
        return ""
    err = ("a: " + describe(a)) if a["code"] is not None else \
        diff(a["prompt_logprobs"], f["logprobs"]) or diff(b["prompt_logprobs"], f["logprobs"])
    if not err and (b["usage"] is None or b["usage"].cached_prompt_tokens != 0):
        err = "the second request was served from the prefix cache"
    report("1 prompt_logprobs: %d entries == the same tokens teacher-forced, cached prompt too"
           % (len(ids) - 1), not err, err or "%d entries" % len(a["prompt_logprobs"]))

    for name, setup in (("21", lambda r: setattr(r.sampling, "prompt_logprobs", 21)),
                        ("with SPECULATIVE prefill",
                         lambda r: r.policy.prefill.__setattr__("kind",
                                                                pb.PrefillPolicy.SPECULATIVE))):
        r = greedy_req(TEXT_PROMPT, 2)
        r.sampling.prompt_logprobs = 1
        setup(r)
        o = collect(api, r)
        report("3 prompt_logprobs %s -> INVALID_ARGUMENT naming sampling.prompt_logprobs" % name,
               o["code"] == grpc.StatusCode.INVALID_ARGUMENT
               and "sampling.prompt_logprobs" in o["details"], describe(o))

    # A long prompt: its entries come over several messages, in order,
    # before any token.
    long_ids = (ids * 200)[:1500]
    req = greedy_req(long_ids, 2)
    req.sampling.prompt_logprobs = 20
    n_entries, plp_msgs, order_ok = 0, 0, True
    seen_token = False
    for r in api.generate(req, timeout=60, metadata=api.md):
        if r.prompt_logprobs:
            plp_msgs += 1
            n_entries += len(r.prompt_logprobs)
            order_ok &= not seen_token
        seen_token |= len(r.token_ids) > 0
    report("1 prompt_logprobs of 1,500 tokens: %d entries over several messages before the first "
           "token" % (len(long_ids) - 1), n_entries == len(long_ids) - 1 and plp_msgs >= 2
           and order_ok, "%d entries in %d messages, in order %s" % (n_entries, plp_msgs,
                                                                    order_ok))

    toks, doc = c_client(kvserve, addr, TEXT_PROMPT, 2, ["--prompt-logprobs", "3"])
    got = [e["logprob"] for e in doc.get("prompt_logprobs", [])] if isinstance(doc, dict) else doc
    want = [p.logprob for p in a["prompt_logprobs"]]
    report("1 kvserve generate --prompt-logprobs 3 --json: the server's",
           isinstance(got, list) and len(got) == len(want)
           and all(abs(x - y) < 1e-6 for x, y in zip(got, want)), str(got)[:200])


def check_allowed_and_truncate(api, kvserve, addr):
    """allowed_token_ids: every generated token is one of them (sampled too),
    greedy takes the best of them; bad ids refused.  truncate_prompt_tokens:
    a prompt longer than N runs as its last N tokens, also one longer than
    the maximum model length; 0 refused."""
    allowed = [101, 115]  # 'e', 's'
    req = greedy_req(TEXT_PROMPT, 8)
    req.sampling.temperature = 1.5
    req.sampling.seed = 7
    req.sampling.allowed_token_ids.extend(allowed)
    o = collect(api, req)
    g = greedy_req(TEXT_PROMPT, 1)
    g.sampling.allowed_token_ids.extend(allowed)
    g.sampling.logprobs = 20
    gr = collect(api, g)
    lp = {t: x for t, x in zip(gr["logprobs"][0].top_ids, gr["logprobs"][0].top_logprobs)} \
        if gr["logprobs"] else {}
    best = max(allowed, key=lambda t: lp.get(t, -1e9))
    toks, _ = c_client(kvserve, addr, TEXT_PROMPT, 8,
                       ["--temperature", "1.5", "--seed", "7", "--allowed-token-ids",
                        ",".join(map(str, allowed))])
    report("1 allowed_token_ids: sampled and greedy tokens only from the list, greedy its best",
           o["code"] is None and len(o["tokens"]) == 8 and set(o["tokens"]) <= set(allowed)
           and gr["tokens"] == [best] and toks == o["tokens"],
           "sampled %s, greedy %s (best %d), C client %s" % (o["tokens"], gr["tokens"], best, toks))
    bad = greedy_req(TEXT_PROMPT, 2)
    bad.sampling.allowed_token_ids.extend([5, 100000])
    b = collect(api, bad)
    report("3 allowed_token_ids out of the vocabulary -> INVALID_ARGUMENT naming it",
           b["code"] == grpc.StatusCode.INVALID_ARGUMENT
           and "sampling.allowed_token_ids[1]" in b["details"], describe(b))

    ids = list(api.tokenize(pb.TokenizeRequest(text=TEXT_PROMPT * 6), timeout=5).ids)
    k = 9
    cut = greedy_req(TEXT_PROMPT * 6, 6)
    cut.truncate_prompt_tokens = k
    c = collect(api, cut)
    tail = collect(api, greedy_req(ids[-k:], 6))
    long_ids = (ids * (MAX_MODEL_LEN // len(ids) + 2))[:MAX_MODEL_LEN + 40]
    lr = greedy_req(long_ids, 6)
    lr.truncate_prompt_tokens = k
    lo = collect(api, lr)
    lt = collect(api, greedy_req(long_ids[-k:], 6))
    toks, doc = c_client(kvserve, addr, TEXT_PROMPT * 6, 6, ["--truncate-prompt-tokens", str(k)])
    report("1 truncate_prompt_tokens %d: the last %d tokens' output, past the model length too"
           % (k, k), c["code"] is None and c["usage"].prompt_tokens == k
           and c["tokens"] == tail["tokens"] and lo["code"] is None
           and lo["tokens"] == lt["tokens"] and toks == c["tokens"],
           "cut %s (%s prompt), alone %s; long %s vs %s; C client %s"
           % (c["tokens"], c["usage"].prompt_tokens if c["usage"] else "?", tail["tokens"],
              describe(lo), lt["tokens"], toks))
    z = greedy_req(TEXT_PROMPT, 2)
    z.truncate_prompt_tokens = 0
    zo = collect(api, z)
    report("3 truncate_prompt_tokens 0 -> INVALID_ARGUMENT naming it",
           zo["code"] == grpc.StatusCode.INVALID_ARGUMENT
           and "truncate_prompt_tokens" in zo["details"], describe(zo))


def check_guided_choice(api, kvserve, addr):
    """guided_choice: greedy and four sampled outputs each spell one of the
    choices and end with FINISH_REASON_STOP; the passkey prompt picks the
    right number greedily; bad sets and forced tokens refused."""
    choices = [" 4821", " 1234", " 48", " 9"]
    req = greedy_req("The passkey is 4821. Remember it. The passkey is", 12)
    req.sampling.guided_choice.extend(choices)
    g = collect(api, req)
    req.sampling.temperature = 1.5
    req.sampling.seed = 11
    req.sampling.n = 4
    outs, err = collect_samples(api, req, 4)
    toks, doc = c_client(kvserve, addr, "The passkey is 4821. Remember it. The passkey is", 12,
                         sum((["--guided-choice", c] for c in choices), []))
    ok = (g["code"] is None and g["text"] == " 4821" and g["finish"] == pb.FINISH_REASON_STOP
          and not err and all(o["text"] in choices and o["finish"] == pb.FINISH_REASON_STOP
                              for o in outs)
          and isinstance(doc, dict) and doc.get("text") == " 4821")
    report("1 guided_choice: greedy picks ' 4821', 4 samples each a choice, FINISH_REASON_STOP", ok,
           "greedy %r %s; samples %s %s; C client %s"
           % (g["text"], finish_name(g["finish"]),
              [(o["text"], finish_name(o["finish"])) for o in outs], err, str(doc)[:120]))
    # min_tokens bans EOS and stop ids; it does not hold a guide past its end.
    req = greedy_req("The passkey is 4821. Remember it. The passkey is", 12)
    req.sampling.guided_choice.extend(choices)
    req.sampling.min_tokens = 10
    m = collect(api, req)
    report("1 guided_choice with min_tokens 10 still ends at the choice",
           m["code"] is None and m["text"] == g["text"] and m["tokens"] == g["tokens"]
           and m["finish"] == pb.FINISH_REASON_STOP, describe(m))
    for name, setup, field in (
            ("an empty string", lambda r: r.sampling.guided_choice.append(""),
             "sampling.guided_choice[1]"),
            ("65 strings", lambda r: r.sampling.guided_choice.extend(["y"] * 64),
             "sampling.guided_choice"),
            ("with forced_tokens", lambda r: r.forced_tokens.ids.extend([5]), "forced_tokens")):
        r = greedy_req(TEXT_PROMPT, 4)
        r.sampling.guided_choice.append("x")
        setup(r)
        o = collect(api, r)
        report("3 guided_choice %s -> INVALID_ARGUMENT naming %s" % (name, field),
               o["code"] == grpc.StatusCode.INVALID_ARGUMENT and field in o["details"],
               describe(o))


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age"],
}


def person_ok(text):
    """Whether text is a JSON object PERSON_SCHEMA accepts, keys in its order."""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    if not isinstance(doc, dict) or "name" not in doc or "age" not in doc:
        return False
    order = [k for k in PERSON_SCHEMA["properties"] if k in doc]
    name, age = doc["name"], doc["age"]
    return (list(doc) == order and isinstance(name, str) and 1 <= len(name) <= 12
            and type(age) is int and 0 <= age <= 120
            and all(t in ("red", "blue") for t in doc.get("tags", []))
            and len(doc.get("tags", [])) <= 3
            and isinstance(doc.get("ok", True), bool))


def guided_runs(api, kvserve, addr, req, seed, temperature, client_args, samples_ws=None):
    """req greedy, then 4 samples of it at temperature (with samples_ws as
    their whitespace pattern when given), then greedy from the C client.
    Returns (greedy, samples, samples' error, C client's JSON)."""
    g = collect(api, req)
    req.sampling.temperature = temperature
    req.sampling.seed = seed
    req.sampling.n = 4
    if samples_ws is not None:
        req.sampling.guided_whitespace_pattern = samples_ws
    outs, err = collect_samples(api, req, 4)
    _, doc = c_client(kvserve, addr, TEXT_PROMPT, req.sampling.max_tokens, client_args)
    return g, outs, err, doc


def guided_detail(g, outs, err, doc):
    return ("greedy %r %s; samples %s %s; C client %s"
            % (g["text"], finish_name(g["finish"]),
               [(o["text"], finish_name(o["finish"])) for o in outs], err, str(doc)[:160]))


def refused_guide(api, name, setup, field):
    """A request that setup spoils is refused naming field."""
    r = greedy_req(TEXT_PROMPT, 4)
    setup(r)
    o = collect(api, r)
    report("3 guided %s -> INVALID_ARGUMENT naming %s" % (name, field),
           o["code"] == grpc.StatusCode.INVALID_ARGUMENT and field in o["details"], describe(o))


def check_guided_regex_json(api, kvserve, addr, work):
    """guided_regex and guided_json: greedy and sampled outputs of the
    bundled model are whole matches (Python's re) / JSON the schema accepts
    (keys in order, bounds kept) and end with FINISH_REASON_STOP; the C
    client's flags (a schema from @FILE); patterns and schemas that cannot
    be honoured refused naming the field, the offset or the schema path."""
    pat = r"[A-Z]{2}-\d{3}(?:-[a-z]{1,4})?"
    req = greedy_req(TEXT_PROMPT, 16)
    req.sampling.guided_regex = pat
    g, outs, err, doc = guided_runs(api, kvserve, addr, req, 7, 1.5, ["--guided-regex", pat])
    ok = (g["code"] is None and re.fullmatch(pat, g["text"]) is not None
          and g["finish"] == pb.FINISH_REASON_STOP and not err
          and all(re.fullmatch(pat, o["text"]) and o["finish"] == pb.FINISH_REASON_STOP
                  for o in outs)
          and isinstance(doc, dict) and doc.get("text") == g["text"])
    report("1 guided_regex: greedy and 4 sampled outputs whole matches, FINISH_REASON_STOP", ok,
           guided_detail(g, outs, err, doc))

    schema = json.dumps(PERSON_SCHEMA)
    req = greedy_req(TEXT_PROMPT, 200)
    req.sampling.guided_json = schema
    path = os.path.join(work, "person.schema.json")
    with open(path, "w") as f:
        f.write(schema)
    g, outs, err, doc = guided_runs(api, kvserve, addr, req, 3, 1.0, ["--guided-json", "@" + path],
                                    samples_ws="")
    ok = (g["code"] is None and person_ok(g["text"]) and g["finish"] == pb.FINISH_REASON_STOP
          and not err and all(person_ok(o["text"]) and o["finish"] == pb.FINISH_REASON_STOP
                              and not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "",
                                                                 o["text"])) for o in outs)
          and isinstance(doc, dict) and doc.get("text") == g["text"])
    report("1 guided_json: greedy and 4 sampled outputs (compact: whitespace pattern '') valid "
           "under the schema, keys in order, FINISH_REASON_STOP", ok,
           guided_detail(g, outs, err, doc))

    for name, setup, field in (
            ("a bad pattern", lambda r: setattr(r.sampling, "guided_regex", "ab(c"),
             "sampling.guided_regex: at offset 4"),
            ("lookahead", lambda r: setattr(r.sampling, "guided_regex", "(?=a)a"),
             "lookaround"),
            ("a pattern too complex", lambda r: setattr(r.sampling, "guided_regex",
                                                        "(a|b)*a(a|b){16}"), "too complex"),
            ("regex and choice", lambda r: (setattr(r.sampling, "guided_regex", "a"),
                                            r.sampling.guided_choice.append("a")),
             "at most one of"),
            ("regex and forced tokens", lambda r: (setattr(r.sampling, "guided_regex", "a"),
                                                   r.forced_tokens.ids.extend([5])),
             "forced_tokens"),
            ("malformed JSON", lambda r: setattr(r.sampling, "guided_json", "{\"type\": "),
             "sampling.guided_json: line 1"),
            ("an unsupported keyword", lambda r: setattr(
                r.sampling, "guided_json",
                json.dumps({"type": "object", "properties": {
                    "n": {"type": "integer", "multipleOf": 3}}})),
             "/properties/n"),
            ("whitespace without a schema", lambda r: setattr(
                r.sampling, "guided_whitespace_pattern", " "), "only with guided_json"),
            ("a bad whitespace pattern", lambda r: (
                setattr(r.sampling, "guided_json", "{}"),
                setattr(r.sampling, "guided_whitespace_pattern", "[ ")),
             "sampling.guided_whitespace_pattern: at offset")):
        refused_guide(api, name, setup, field)


LIST_GBNF = r"""# nested lists of short words
root ::= "(" list ")"
list ::= item ("," ws item)*
item ::= [a-z]{1,3} | "(" list ")"
ws   ::= " "?
"""


def list_says(text):
    """What LIST_GBNF makes of text: "whole", "prefix" or "bad"."""
    depth, want_item, word = 0, True, 0
    if not text.startswith("("):
        return "prefix" if text == "" else "bad"
    i = 1
    depth = 1
    while i < len(text):
        c = text[i]
        if depth == 0:
            return "bad"
        if "a" <= c <= "z":
            if not want_item and word == 0 or word == 3:
                return "bad"
            word, want_item = word + 1, False
        elif c == "(" and want_item:
            depth += 1
        elif c == ")" and not want_item:
            depth, word = depth - 1, 0
        elif c == "," and not want_item:
            want_item, word = True, 0
            if text[i + 1:i + 2] == " ":
                i += 1
        else:
            return "bad"
        i += 1
    return "whole" if depth == 0 else "prefix"


def check_guided_grammar(api, kvserve, addr, work):
    """guided_grammar: greedy and sampled outputs of the bundled model are
    sentences of a recursive GBNF grammar (nested lists), FINISH_REASON_STOP
    when whole, a prefix of one when max_tokens cut them; the C client's
    --guided-grammar @FILE; grammars that cannot be honoured refused naming
    the field and the reason."""
    req = greedy_req(TEXT_PROMPT, 48)
    req.sampling.guided_grammar = LIST_GBNF
    path = os.path.join(work, "list.gbnf")
    with open(path, "w") as f:
        f.write(LIST_GBNF)
    g, outs, err, doc = guided_runs(api, kvserve, addr, req, 11, 1.2, ["--guided-grammar", "@" + path])

    def fine(o):
        says = list_says(o["text"])
        return (says == "whole" and o["finish"] == pb.FINISH_REASON_STOP) or (
            says == "prefix" and o["finish"] == pb.FINISH_REASON_LENGTH)
    ok = (g["code"] is None and fine(g) and not err and all(fine(o) for o in outs)
          and any(list_says(o["text"]) == "whole" for o in [g] + outs)
          and isinstance(doc, dict) and doc.get("text") == g["text"])
    report("1 guided_grammar: greedy and 4 sampled outputs sentences of a recursive grammar "
           "(or prefixes cut by max_tokens)", ok, guided_detail(g, outs, err, doc))

    for name, setup, field in (
            ("a rule not defined", lambda r: setattr(r.sampling, "guided_grammar", "root ::= x"),
             "sampling.guided_grammar: at offset 9: no rule 'x'"),
            ("left recursion", lambda r: setattr(r.sampling, "guided_grammar",
                                                 "root ::= root \"a\" | \"b\""),
             "left-recursive"),
            ("grammar and regex", lambda r: (setattr(r.sampling, "guided_grammar",
                                                     "root ::= \"a\""),
                                             setattr(r.sampling, "guided_regex", "a")),
             "sampling.guided_grammar: at most one of"),
            ("an empty grammar", lambda r: setattr(r.sampling, "guided_grammar", ""),
             "sampling.guided_grammar: 0 bytes"),
            ("grammar and forced tokens", lambda r: (setattr(r.sampling, "guided_grammar",
                                                             "root ::= \"a\""),
                                                     r.forced_tokens.ids.extend([5])),
             "forced_tokens")):
        refused_guide(api, name, setup, field)


def check_include_stop(api, kvserve, addr):
    """include_stop_str_in_output: the stop string ends the text (and its
    last token stays); the stop token too; without it neither."""
    plain = collect(api, greedy_req(TEXT_PROMPT, 12))
    text = plain["text"]
    stop = text[2:5] if len(text) >= 5 else "x"
    at = text.find(stop)
    outs = {}
    for inc in (False, True):
        r = greedy_req(TEXT_PROMPT, 12)
        r.sampling.ignore_eos = False
        r.sampling.stop.append(stop)
        if inc:
            r.sampling.include_stop_str_in_output = True
        outs[inc] = collect(api, r)
    toks, doc = c_client(kvserve, addr, TEXT_PROMPT, 12, ["--stop", stop,
                                                          "--include-stop-str-in-output"])
    a, b = outs[False], outs[True]
    ok = (at >= 0 and a["text"] == text[:at] and b["text"] == text[:at + len(stop)]
          and a["finish"] == b["finish"] == pb.FINISH_REASON_STOP
          and len(b["tokens"]) == len(a["tokens"]) + 1 and b["tokens"][:-1] == a["tokens"]
          and isinstance(doc, dict) and doc.get("text") == b["text"])
    sid = collect(api, greedy_req(TEXT_PROMPT, 12))["tokens"][3]
    r = greedy_req(TEXT_PROMPT, 12)
    r.sampling.stop_token_ids.append(sid)
    r.sampling.include_stop_str_in_output = True
    c = collect(api, r)
    ok = ok and c["tokens"] == plain["tokens"][:4] and c["finish"] == pb.FINISH_REASON_STOP
    report("1 include_stop_str_in_output: the stop string or token ends the output",
           ok, "stop %r: without %r, with %r, C client %s; stop id %d: %s"
           % (stop, a["text"], b["text"], str(doc)[:80], sid, c["tokens"]))


def concurrent_prompts():
    words = ["grass", "sky", "sea", "cat", "dog", "sun", "moon", "tree"]
    ps = []
    for i in range(64):
        w = words[i % len(words)]
        ps.append("Story %d: the %s was%s" % (i, w, " very" * (i // 16)))
    return ps


def check_concurrent(api):
    prompts = concurrent_prompts()
    solo = []
    for p in prompts:
        o = collect(api, greedy_req(p), timeout=30)
        if o["code"] is not None:
            return report("2 concurrency: solo runs", False, "prompt %r: %s" % (p, describe(o)))
        solo.append(o["tokens"])
    if len(set(map(tuple, solo))) < 8:
        print("note: only %d distinct solo outputs" % len(set(map(tuple, solo))))
    got = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def worker(i):
        try:
            start.wait(timeout=20)
        except threading.BrokenBarrierError:
            pass
        # Another cache_salt: no KV shared with the solo runs, so the batched
        # prefill and decode are exercised rather than the prefix cache.
        # Odd streams ask for logprobs too (0..20 alternatives), which
        # change nothing else.
        req = greedy_req(prompts[i], cache_salt="concurrent")
        if i % 2:
            req.sampling.logprobs = i % 21
        got[i] = collect(api, req, timeout=60)
    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(prompts))]
    peak = {"running": 0, "queued": 0}
    done = threading.Event()

    def poller():   # evidence that the streams really overlapped (informational)
        while not done.is_set():
            try:
                ld = api.load(timeout=2)
                peak["running"] = max(peak["running"], ld.running)
                peak["queued"] = max(peak["queued"], ld.queued)
            except grpc.RpcError:
                pass
            time.sleep(0.005)
    pt = threading.Thread(target=poller, daemon=True)
    t0 = time.monotonic()
    pt.start()
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=max(1, 90 - (time.monotonic() - t0)))
    dt = time.monotonic() - t0
    done.set()
    pt.join(timeout=5)
    bad = []
    for i, o in enumerate(got):
        if o is None:
            bad.append("stream %d did not finish" % i)
        elif o["code"] is not None or o["tokens"] != solo[i]:
            bad.append("stream %d (%r): %s; got %s, solo %s"
                       % (i, prompts[i], describe(o), o["tokens"], solo[i]))
        elif i % 2 and (len(o["logprobs"]) != len(o["tokens"]) or any(
                len(lp.top_ids) != i % 21 or (lp.top_ids and lp.top_ids[0] != t)
                or lp.logprob > 0 for t, lp in zip(o["tokens"], o["logprobs"]))):
            bad.append("stream %d: %d logprobs for %d tokens, first %s"
                       % (i, len(o["logprobs"]), len(o["tokens"]),
                          o["logprobs"][0] if o["logprobs"] else None))
        elif i % 2 == 0 and o["logprobs"]:
            bad.append("stream %d: logprobs it did not ask for" % i)
    report("2 concurrency: 64 concurrent streams == their solo outputs (half with logprobs)",
           not bad,
           ("%d bad, first: %s" % (len(bad), bad[0])) if bad
           else "%d streams in %.2f s, peak running %d, queued %d"
           % (len(prompts), dt, peak["running"], peak["queued"]))


def bench_problems(doc, n, out_len, in_len):
    """What is wrong with a `kvserve bench --json` document of n requests."""
    bad = []
    reqs, summ = doc.get("requests", []), doc.get("summary", {})
    if len(reqs) != n:
        bad.append("%d records, not %d" % (len(reqs), n))
    for r in reqs:
        if r["status_name"] != "OK" or r["status"] != 0:
            bad.append("request %d: %s %s" % (r["index"], r["status_name"], r["message"]))
        elif not 0 < r["ttft_ms"] <= r["e2e_ms"]:
            bad.append("request %d: ttft %.3f e2e %.3f" % (r["index"], r["ttft_ms"], r["e2e_ms"]))
        elif r["output_tokens"] != out_len or r["prompt_tokens"] != in_len:
            bad.append("request %d: %d/%d tokens out/in, asked %d/%d" % (
                r["index"], r["output_tokens"], r["prompt_tokens"], out_len, in_len))
        elif len(r["itl_ms"]) > out_len - 1 or any(x < 0 for x in r["itl_ms"]):
            bad.append("request %d: itl %s" % (r["index"], r["itl_ms"]))
        if len(bad) > 3:
            break
    ok = [r for r in reqs if r["status"] == 0]
    tot_out = sum(r["output_tokens"] for r in ok)
    tot_in = sum(r["prompt_tokens"] for r in ok)
    d = summ.get("duration_s", 0)
    if summ.get("completed") != n or summ.get("failed") != 0 or summ.get("errors"):
        bad.append("summary counts %s/%s errors %s" % (summ.get("completed"), summ.get("failed"),
                                                       summ.get("errors")))
    if summ.get("total_output_tokens") != tot_out or summ.get("total_input_tokens") != tot_in:
        bad.append("summary tokens %s/%s != records %d/%d" % (
            summ.get("total_output_tokens"), summ.get("total_input_tokens"), tot_out, tot_in))
    if not (d > 0 and abs(summ["request_throughput"] - n / d) <= 1e-3 * n / d + 1e-3
            and abs(summ["output_throughput"] - tot_out / d) <= 1e-3 * tot_out / d + 1e-3):
        bad.append("throughput %s/%s vs duration %s" % (summ.get("request_throughput"),
                                                        summ.get("output_throughput"), d))
    last_end = max((r["start_s"] + r["e2e_ms"] / 1e3 for r in reqs), default=0.0)
    if d < last_end - 1e-3:
        bad.append("duration %.4f ends before the last request (%.4f)" % (d, last_end))
    for key, vals in (("ttft_ms", [r["ttft_ms"] for r in ok]), ("e2e_ms", [r["e2e_ms"] for r in ok]),
                      ("itl_ms", [x for r in ok for x in r["itl_ms"]])):
        st = summ.get(key, {})
        mean = sum(vals) / len(vals) if vals else 0.0
        if st.get("n") != len(vals) or abs(st.get("mean", -1) - mean) > 1e-2 + 1e-3 * mean:
            bad.append("%s summary %s vs records n=%d mean=%.4f" % (key, st, len(vals), mean))
        elif vals and not (min(vals) - 1e-3 <= st["p50"] <= st["p90"] <= st["p95"] <= st["p99"]
                           <= max(vals) + 1e-3):
            bad.append("%s percentiles out of order: %s" % (key, st))
    return bad


def check_bench(kvserve, addr, work):
    """`kvserve bench`, closed and open loop, against this server."""
    runs = (("closed loop", ["--num-requests", "20", "--concurrency", "4"], 20),
            ("open loop", ["--request-rate", "50", "--num-requests", "10",
                           "--shared-prefix", "0.5", "--seed", "3"], 10))
    for label, flags, n in runs:
        name = "10 bench: %s, %d requests" % (label, n)
        rc, out, doc = run_bench_json(kvserve, addr, work, label.split()[0],
                                      ["--input-len", "64", "--output-len", "8"] + flags,
                                      timeout=60)
        if rc != 0:
            report(name, False, "exit %d: %s" % (rc, out[-700:]))
            continue
        if doc is None:
            report(name, False, "no JSON")
            continue
        bad = bench_problems(doc, n, 8, 64)
        if "TTFT" not in out or "Output token throughput" not in out:
            bad.append("no summary table on stdout: %r" % out[-300:])
        s = doc.get("summary", {})
        report(name, not bad, "; ".join(bad[:4]) or "%.1f req/s, %.0f tok/s, TTFT p50 %.1f ms" % (
            s["request_throughput"], s["output_throughput"], s["ttft_ms"]["p50"]))
    check_bench_modes(kvserve, addr, work)
    # Structured output under load: every request guided by a grammar; each
    # output ends when the grammar's sentence does, within the length.
    path = os.path.join(work, "bench.gbnf")
    with open(path, "w") as f:
        f.write(LIST_GBNF)
    rc, out, doc = run_bench_json(kvserve, addr, work, "guided", [
        "--num-requests", "8", "--concurrency", "4", "--input-len", "32", "--output-len", "24",
        "--guided-grammar", "@" + path])
    reqs = doc["requests"] if doc else []
    ok = (rc == 0 and doc is not None and doc["config"]["policy"].get("guided") == "grammar"
          and doc["summary"]["completed"] == 8 and "guided_grammar" in out
          and all(r["status_name"] == "OK" and 1 <= r["output_tokens"] <= 24 for r in reqs))
    report("10 bench --guided-grammar: 8 guided requests complete", ok,
           "exit %d: %s" % (rc, (json.dumps(doc["summary"]) if doc else out[-300:])))
    r = subprocess.run([kvserve, "bench", "--addr", addr, "--num-requests", "0"],
                       capture_output=True, text=True, timeout=30)
    report("10 bench: a bad flag exits 2 naming it", r.returncode == 2 and "--num-requests"
           in r.stderr, "exit %d: %s" % (r.returncode, r.stderr.strip()[:120]))
    bad = os.path.join(work, "no-such-dir", "bench.json")
    r = subprocess.run([kvserve, "bench", "--addr", addr, "--num-requests", "4", "--json", bad],
                       capture_output=True, text=True, timeout=30)
    report("10 bench: an unwritable --json exits 2 before running", r.returncode == 2
           and "--json" in r.stderr and "Successful requests" not in r.stdout,
           "exit %d: %s" % (r.returncode, r.stderr.strip()[:120]))


def run_bench_json(kvserve, addr, work, label, flags, timeout=120):
    """Runs `kvserve bench --json` with flags: (exit code, its output, doc or None)."""
    path = os.path.join(work, "bench-%s.json" % label)
    cmd = [kvserve, "bench", "--addr", addr, "--timeout-ms", "30000", "--json", path,
           "--no-progress"] + flags
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    try:
        with open(path) as f:
            return r.returncode, r.stdout + r.stderr, json.load(f)
    except (OSError, ValueError):
        return r.returncode, r.stdout + r.stderr, None


def check_bench_modes(kvserve, addr, work):
    """Multi-turn conversations, fault injection with the plot, and
    per-request policies through `kvserve bench`."""
    # Three conversations of three turns: each turn resends the previous
    # prompt and answer plus 8 new tokens, and the prefix cache serves the
    # history.
    rc, out, doc = run_bench_json(kvserve, addr, work, "turns", [
        "--multi-turn", "3", "--question-len", "8", "--num-requests", "9", "--concurrency", "3",
        "--input-len", "64", "--output-len", "8"])
    bad = [] if doc else ["no JSON (exit %d): %s" % (rc, out[-300:])]
    reqs = doc["requests"] if doc else []
    by = {(r["conversation"], r["turn"]): r for r in reqs}
    if doc and (rc != 0 or len(reqs) != 9 or doc["summary"]["completed"] != 9):
        bad.append("exit %d, %d records, summary %s" % (rc, len(reqs), doc["summary"]))
    for (c, t), r in sorted(by.items()):
        if r["status_name"] != "OK":
            bad.append("conversation %d turn %d: %s" % (c, t, r["status_name"]))
        elif t == 0 and r["prompt_tokens"] != 64 + 8:
            bad.append("conversation %d: first prompt %d tokens" % (c, r["prompt_tokens"]))
        elif t > 0 and (r["prompt_tokens"] != by[(c, t - 1)]["prompt_tokens"] + 8 + 8
                        or r["cached_prompt_tokens"] < 64):
            bad.append("conversation %d turn %d: prompt %d, cached %d, previous %d" % (
                c, t, r["prompt_tokens"], r["cached_prompt_tokens"],
                by[(c, t - 1)]["prompt_tokens"]))
    report("10 bench: multi-turn, 3 conversations x 3 turns", not bad, "; ".join(bad[:3]) or
           "%.0f%% of input tokens cached" % (100 * doc["summary"]["cached_share"]))

    # Three outputs a request (sampling.n): every output's tokens counted,
    # TPOT per output.
    rc, out, doc = run_bench_json(kvserve, addr, work, "n3", [
        "--n", "3", "--num-requests", "6", "--concurrency", "3", "--input-len", "48",
        "--output-len", "10"])
    bad = [] if doc else ["no JSON (exit %d): %s" % (rc, out[-300:])]
    if doc:
        s = doc["summary"]
        if rc != 0 or s["completed"] != 6 or s["total_output_tokens"] != 6 * 3 * 10 or \
                doc["config"].get("n") != 3:
            bad.append("exit %d, summary %s" % (rc, s))
        bad += ["request %d: %d of %d tokens, tpot %s" % (r["index"], r["output_tokens"],
                                                          r["requested_output_tokens"],
                                                          r["tpot_ms"])
                for r in doc["requests"] if r["output_tokens"] != 30
                or r["requested_output_tokens"] != 30 or not r["tpot_ms"] > 0]
    report("10 bench --n 3: 3 outputs of 10 tokens for each of 6 requests", not bad,
           "; ".join(bad[:3]) or "%d output tokens" % doc["summary"]["total_output_tokens"])

    # A third of the calls cancelled by the client, a third with short
    # deadlines: those endings are intended, nothing else may fail.
    svg = os.path.join(work, "bench.svg")
    rc, out, doc = run_bench_json(kvserve, addr, work, "faults", [
        "--num-requests", "30", "--concurrency", "10", "--input-len", "64", "--output-len", "96",
        "--cancel-fraction", "0.34", "--cancel-after-ms", "40", "--deadline-fraction", "0.33",
        "--deadline-ms", "60", "--seed", "5", "--plot", svg])
    bad = [] if doc else ["no JSON (exit %d): %s" % (rc, out[-300:])]
    seen = set()
    for r in doc["requests"] if doc else []:
        want = {"none": "OK", "cancel": "CANCELLED", "deadline": "DEADLINE_EXCEEDED"}[r["intent"]]
        if r["status_name"] not in ("OK", want):
            bad.append("request %d (%s): %s %s" % (r["index"], r["intent"], r["status_name"],
                                                  r["message"]))
        seen.add(r["status_name"])
    if doc:
        s = doc["summary"]
        if rc != 0 or s["failed"] != 0 or s["completed"] + s["cancelled"] + \
                s["deadline_exceeded"] != 30:
            bad.append("exit %d, summary %s" % (rc, {k: s[k] for k in (
                "completed", "cancelled", "deadline_exceeded", "failed")}))
        if not {"CANCELLED", "DEADLINE_EXCEEDED"} <= seen:
            bad.append("endings seen: %s" % sorted(seen))
    try:
        root = ET.parse(svg).getroot()
        if len(root.findall(".//{http://www.w3.org/2000/svg}polyline")) < 3:
            bad.append("the plot has no curves")
    except (OSError, ET.ParseError) as e:
        bad.append("plot: %s" % e)
    report("10 bench: cancellations and deadlines are intended, plot written", not bad,
           "; ".join(bad[:3]) or "%d ok, %d cancelled, %d past deadline" % (
               doc["summary"]["completed"], doc["summary"]["cancelled"],
               doc["summary"]["deadline_exceeded"]))

    # Per-request policy flags reach the server: a valid one runs, a bad
    # budget comes back INVALID_ARGUMENT and bench exits 1.
    rc, out, doc = run_bench_json(kvserve, addr, work, "policy", [
        "--num-requests", "4", "--input-len", "200", "--output-len", "4",
        "--attention", "sink-window", "--attn-window", "64",
        "--kv-policy", "sink-eviction", "--kv-budget", "96"])
    rc2, out2, doc2 = run_bench_json(kvserve, addr, work, "policy-bad", [
        "--num-requests", "2", "--input-len", "64", "--output-len", "4",
        "--kv-policy", "snapkv", "--kv-budget", "8"])
    rc3, out3, doc3 = run_bench_json(kvserve, addr, work, "policy-quest", [
        "--num-requests", "2", "--input-len", "300", "--output-len", "8",
        "--decode-top-k", "4"])
    ok = (rc == 0 and doc and doc["summary"]["completed"] == 4 and
          rc3 == 0 and doc3 and doc3["summary"]["completed"] == 2 and
          doc3["config"]["policy"].get("decode_top_k") == 4 and
          doc3["config"]["policy"].get("attention") == "dense" and
          doc["config"]["policy"].get("kv_policy") == "sink-eviction" and
          rc2 == 1 and doc2 and doc2["summary"]["errors"].get("INVALID_ARGUMENT") == 2 and
          "budget" in doc2["requests"][0]["message"])
    report("10 bench: per-request policy flags", ok, "exit %d/%d/%d: %s | %s | %s" % (
        rc, rc2, rc3, (doc2["requests"][0]["message"] if doc2 else out2[-200:]), out[-200:],
        out3[-200:]))


def check_bench_dataset(api, kvserve, addr, work):
    """`kvserve bench --dataset`: text prompts tokenized by the server, each
    entry's output length, entries past max_model_len skipped, ShareGPT
    answers' lengths, a bad entry refused naming its line and field."""
    prompts = ["The grass is green. ", "The sky is blue. The sun is yellow. " * 3,
               "Here we go. Off we go again. " * 9]
    n_ids = [len(api.tokenize(pb.TokenizeRequest(text=t), timeout=5).ids) for t in prompts]
    path = os.path.join(work, "dataset-text.jsonl")
    with open(path, "w") as f:
        for i, t in enumerate(prompts):
            f.write(json.dumps({"prompt": t, "output_len": 5 + i}) + "\n")
        f.write("\n")
        f.write(json.dumps({"prompt": "x" * 5000}) + "\n")  # past max_model_len 2048
    runs = [run_bench_json(kvserve, addr, work, "data%d" % k, [
        "--dataset", path, "--num-requests", "6", "--concurrency", "2", "--seed", "4"])
        for k in range(2)]
    rc, out, doc = runs[0]
    bad = [] if doc else ["no JSON (exit %d): %s" % (rc, out[-300:])]
    if doc:
        c, want = doc["config"], {n: 5 + i for i, n in enumerate(n_ids)}
        if rc != 0 or doc["summary"]["completed"] != 6 or "Dataset:" not in out:
            bad.append("exit %d, summary %s" % (rc, doc["summary"]))
        if (c.get("dataset"), c.get("dataset_entries"), c.get("dataset_examined"),
                c.get("dataset_taken"), c.get("dataset_too_long")) != (path, 4, 4, 3, 1):
            bad.append("config %s" % {k: v for k, v in c.items() if k.startswith("dataset")})
        seen = [r["prompt_tokens"] for r in doc["requests"]]
        if sorted(seen) != sorted(n_ids * 2) or seen[:3] != seen[3:]:
            bad.append("prompt tokens %s, entries %s (each twice, in one order)" % (seen, n_ids))
        bad += ["request %d: %d prompt tokens, %d output tokens" % (
            r["index"], r["prompt_tokens"], r["output_tokens"]) for r in doc["requests"]
            if want.get(r["prompt_tokens"]) != r["output_tokens"] or r["status_name"] != "OK"]
        again = runs[1][2]
        if not again or [r["prompt_tokens"] for r in again["requests"]] != seen:
            bad.append("the same seed took another order")
    report("10 bench --dataset: JSON Lines prompts, output_len, a too-long entry skipped",
           not bad, "; ".join(bad[:3]) or "prompts of %s tokens" % n_ids)

    # ShareGPT: the first turn asks, the second's tokens are the output
    # length; a conversation without an answer is skipped; --output-len
    # overrides.
    answers = ["Green. " * 3, "Blue, of course. " * 2]
    a_ids = [len(api.tokenize(pb.TokenizeRequest(text=t, add_bos=False), timeout=5).ids)
             for t in answers]
    path = os.path.join(work, "dataset-sharegpt.json")
    with open(path, "w") as f:
        json.dump([{"id": "a", "conversations": [{"from": "human", "value": prompts[0]},
                                                 {"from": "gpt", "value": answers[0]}]},
                   {"id": "b", "conversations": [{"from": "human", "value": "Unanswered."}]},
                   {"id": "c", "conversations": [{"from": "human", "value": prompts[1]},
                                                 {"from": "gpt", "value": answers[1]},
                                                 {"from": "human", "value": "More?"}]}], f)
    rc, out, doc = run_bench_json(kvserve, addr, work, "sharegpt", [
        "--dataset", path, "--num-requests", "4", "--concurrency", "4"])
    rc2, out2, doc2 = run_bench_json(kvserve, addr, work, "sharegpt-len", [
        "--dataset", path, "--num-requests", "2", "--output-len", "3"])
    want = {n_ids[0]: a_ids[0], n_ids[1]: a_ids[1]}
    ok = (rc == 0 and doc and doc["config"]["dataset_unanswered"] == 1
          and doc["config"]["dataset_taken"] == 2 and len(doc["requests"]) == 4
          and all(want.get(r["prompt_tokens"]) == r["output_tokens"] for r in doc["requests"])
          and rc2 == 0 and doc2 and all(r["output_tokens"] == 3 for r in doc2["requests"]))
    report("10 bench --dataset: ShareGPT answers' lengths, unanswered skipped, --output-len "
           "overrides", ok, "exit %d/%d: %s | %s" % (
               rc, rc2, [(r["prompt_tokens"], r["output_tokens"]) for r in doc["requests"]]
               if doc else out[-300:], out2[-200:]))

    path = os.path.join(work, "dataset-bad.jsonl")
    with open(path, "w") as f:
        f.write('{"prompt": "fine"}\n{"prompt": 3}\n')
    r = subprocess.run([kvserve, "bench", "--addr", addr, "--dataset", path],
                       capture_output=True, text=True, timeout=30)
    r2 = subprocess.run([kvserve, "bench", "--addr", addr, "--dataset", path,
                         "--input-len", "8"], capture_output=True, text=True, timeout=30)
    report("10 bench --dataset: a bad entry is refused naming its line and field; "
           "--input-len beside it exits 2",
           r.returncode == 1 and "line 2" in r.stderr and '"prompt"' in r.stderr
           and r2.returncode == 2 and "--input-len" in r2.stderr,
           "exit %d/%d: %s | %s" % (r.returncode, r2.returncode, r.stderr.strip()[:160],
                                    r2.stderr.strip()[:120]))


def check_cancel_deadline(api):
    # Client cancel after 2 messages.
    ok, detail = True, ""
    call = api.generate(greedy_req(TOKEN_PROMPT, LONG_MAX_TOKENS), timeout=60, metadata=api.md)
    n = 0
    live = None
    try:
        for _ in call:
            n += 1
            if n == 2:
                try:
                    live = api.load()
                except grpc.RpcError:
                    pass
                if not call.cancel():
                    ok, detail = False, "the stream had already ended before cancel()"
                break
        if n < 2:
            ok, detail = False, "the stream ended after %d messages" % n
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            ok, detail = False, "stream failed before cancel: %s %s" % (e.code().name, e.details())
    if ok:
        idle, ld = wait_idle(api)
        ok = idle
        detail = ("load while streaming: %s; after cancel: %s"
                  % (load_str(live) if live is not None else "?", load_str(ld)))
    report("3 cancel mid-stream frees every KV block, nothing running/queued", ok, detail)

    # Deadline expiry.
    t0 = time.monotonic()
    o = collect(api, greedy_req(TOKEN_PROMPT, LONG_MAX_TOKENS), timeout=0.15)
    dt = time.monotonic() - t0
    if o["code"] != grpc.StatusCode.DEADLINE_EXCEEDED:
        report("3 deadline expiry frees every KV block", False,
               "expected DEADLINE_EXCEEDED, got %s after %.2f s (%d messages)"
               % (describe(o), dt, o["messages"]))
    else:
        idle, ld = wait_idle(api)
        report("3 deadline expiry frees every KV block, nothing running/queued", idle,
               "%d messages before the deadline; after: %s" % (o["messages"], load_str(ld)))


def check_abort(api):
    call = api.generate(greedy_req(TOKEN_PROMPT, LONG_MAX_TOKENS), timeout=60, metadata=api.md)
    rid, found, finish, code, details, n, ntok = None, None, None, None, "", 0, 0
    err = ""
    try:
        for r in call:
            n += 1
            ntok += len(r.token_ids)
            if r.HasField("request_id") and rid is None:
                rid = r.request_id
            if n == 1:
                if not rid:
                    err = "the first message carries no request_id"
                    call.cancel()
                    break
                # Without an id, while a generation is live: refused.
                try:
                    api.abort(pb.AbortRequest(), timeout=5, metadata=api.md)
                    err = "Abort without request_id succeeded"
                except grpc.RpcError as e:
                    if (e.code() != grpc.StatusCode.INVALID_ARGUMENT
                            or "request_id" not in (e.details() or "")):
                        err = "Abort without request_id: %s %s" % (e.code().name, e.details())
                try:
                    found = api.abort(pb.AbortRequest(request_id=rid), timeout=5,
                                      metadata=api.md).found
                except grpc.RpcError as e:
                    err = "Abort failed: %s %s" % (e.code().name, e.details())
            if r.HasField("finish_reason"):
                finish = r.finish_reason
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
    ok = (not err and found is True and finish == pb.FINISH_REASON_CANCELLED and code is None
          and ntok < LONG_MAX_TOKENS)
    report("4 Abort(request_id) of a live generation -> finish CANCELLED (one without an id "
           "-> INVALID_ARGUMENT)", ok,
           err or "request_id %r, found=%s, final finish %s, status %s%s, %d tokens"
           % (rid, found, finish_name(finish), code_name(code),
              (" %r" % details) if details else "", ntok))
    idle, ld = wait_idle(api)
    report("4 after Abort every KV block is free", idle, load_str(ld))
    try:
        r = api.abort(pb.AbortRequest(request_id="no-such-request-4711"), timeout=5,
                      metadata=api.md)
        report("4 Abort of an unknown id -> OK, found=false", r.HasField("found") is False
               or r.found is False, "found=%s" % r.found)
    except grpc.RpcError as e:
        report("4 Abort of an unknown id -> OK, found=false", False,
               "%s %s" % (e.code().name, e.details()))
    # A client may pick the id the server would make for the next request
    # without one ("req-N"): that request still runs, under another id.
    name = "4 a request without an id runs while a client's live request holds its 'req-N' id"
    o = collect(api, greedy_req(TOKEN_PROMPT, 2), timeout=15)
    m = re.fullmatch(r"req-(\d+)", o["request_id"] or "")
    if o["code"] is not None or m is None:
        report(name, False, "server-made id %r: %s" % (o["request_id"], describe(o)))
        return
    taken = "req-%d" % (int(m.group(1)) + 2)
    r = greedy_req(TOKEN_PROMPT, LONG_MAX_TOKENS)
    r.request_id = taken
    call = api.generate(r, timeout=60, metadata=api.md)
    try:
        next(call)
        p = collect(api, greedy_req(TOKEN_PROMPT, 2), timeout=15)
        ok = p["code"] is None and p["request_id"] not in (None, "", taken)
        detail = "client's %r live; the next request: %s, id %r" % (taken, describe(p),
                                                                    p["request_id"])
    except (grpc.RpcError, StopIteration) as e:
        ok, detail = False, "the client's %r request ended: %s" % (taken, e)
    call.cancel()
    report(name, ok, detail)


def c_health(kvserve, addr, label, extra=()):
    r = subprocess.run([kvserve, "health", "--addr", addr] + list(extra), capture_output=True,
                       text=True, timeout=30)
    report("%s C client `kvserve health` -> SERVING, exit 0" % label,
           r.returncode == 0 and r.stdout.strip() == "SERVING",
           "exit %d, stdout %r, stderr %r" % (r.returncode, r.stdout.strip(),
                                              r.stderr.strip()[-200:]))


def check_stop_after_silent_token(api):
    """A request with stop strings whose first token has no text (BOS, EOS,
    padding: control tokens) streams and finishes like any other: the
    server searched its still empty text for the stop strings."""
    silent, bad = 0, None
    for seed in range(600):
        req = pb.GenerateRequest()
        req.tokens.ids.extend(TOKEN_PROMPT)
        req.sampling.temperature = 100.0  # nearly uniform over the vocabulary
        req.sampling.seed = seed
        req.sampling.max_tokens = 2
        req.sampling.ignore_eos = True
        req.sampling.stop.append("zq")
        o = collect(api, req, timeout=15)
        if o["code"] is not None or len(o["tokens"]) != 2:
            bad = "seed %d: %s" % (seed, describe(o))
            break
        if o["tokens"][0] >= 256:
            silent += 1
            if silent == 3:
                break
    report("6 stop strings after a first token without text (%d such streams)" % silent,
           bad is None and silent > 0,
           bad or ("" if silent else "no stream began with a control token"))
    if bad is None:
        good_after(api, "stop strings after a token without text")


def check_health(api, label="5"):
    try:
        r = api.check(hpb.HealthCheckRequest(service=""), timeout=5)
        report("%s health Check -> SERVING" % label, r.status == hpb.HealthCheckResponse.SERVING,
               hpb.HealthCheckResponse.ServingStatus.Name(r.status))
    except grpc.RpcError as e:
        report("%s health Check -> SERVING" % label, False,
               "%s %s" % (e.code().name, e.details()))


def good_after(api, what):
    o = collect(api, greedy_req(TOKEN_PROMPT, 4), timeout=15)
    if o["code"] is not None or len(o["tokens"]) != 4:
        report("6 a good request after %s" % what, False, describe(o))
        return False
    return True


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def check_bad_requests(api, vocab):
    def expect(name, req, code, needle=None, raw=False, timeout=20):
        o = collect(api, req, timeout=timeout, raw=raw)
        ok = o["code"] == code and o["messages"] == 0
        if ok and needle and needle not in (o["details"] or ""):
            ok = False
        want = code.name + ((" naming %r" % needle) if needle else "")
        report("6 bad request: %s -> %s" % (name, want), ok,
               "got %s%s" % (code_name(o["code"]),
                             (" %r" % o["details"][:200]) if o["details"] else "")
               + ("" if o["messages"] == 0 else " after %d messages" % o["messages"]))
        good_after(api, name)

    IA = grpc.StatusCode.INVALID_ARGUMENT

    def samp(**kw):
        r = greedy_req(TOKEN_PROMPT, 8)
        for k, v in kw.items():
            setattr(r.sampling, k, v)
        return r

    expect("temperature -1", samp(temperature=-1.0), IA, "sampling.temperature")
    expect("top_p 0", samp(top_p=0.0), IA, "sampling.top_p")
    expect("top_p 1.5", samp(top_p=1.5), IA, "sampling.top_p")
    expect("min_p 2", samp(min_p=2.0), IA, "sampling.min_p")
    expect("max_tokens 0", samp(max_tokens=0), IA, "sampling.max_tokens")
    expect("logprobs 21", samp(logprobs=21), IA, "sampling.logprobs")
    expect("min_tokens 9 > max_tokens 8", samp(min_tokens=9), IA, "sampling.min_tokens")
    r = greedy_req(TOKEN_PROMPT, 2)
    r.forced_tokens.ids.extend([72, 73, 74])
    expect("3 forced tokens, max_tokens 2", r, IA, "forced_tokens")
    r = greedy_req(TOKEN_PROMPT, 4)
    r.forced_tokens.ids.extend([72, vocab])
    expect("forced token id == n_vocab", r, IA, "forced_tokens.ids[1]")
    expect("repetition_penalty 0", samp(repetition_penalty=0.0), IA,
           "sampling.repetition_penalty")
    expect("presence_penalty 3", samp(presence_penalty=3.0), IA, "sampling.presence_penalty")
    expect("frequency_penalty NaN", samp(frequency_penalty=float("nan")), IA,
           "sampling.frequency_penalty")
    r = pb.GenerateRequest()
    r.sampling.max_tokens = 8
    expect("no prompt (oneof unset)", r, IA)
    r = pb.GenerateRequest()
    r.tokens.SetInParent()
    r.sampling.max_tokens = 8
    expect("empty token list", r, IA)
    r = pb.GenerateRequest(text="")
    r.sampling.max_tokens = 8
    expect("empty text", r, IA)
    expect("token id 999999", greedy_req([256, 999999, 72], 8), IA)
    expect("token id == n_vocab (%d)" % vocab, greedy_req([256, vocab], 8), IA)
    expect("prompt longer than max model len",
           greedy_req([72] * (MAX_MODEL_LEN + 10), 8), grpc.StatusCode.OUT_OF_RANGE)
    expect("prompt + max_tokens > max model len",
           greedy_req(TOKEN_PROMPT, MAX_MODEL_LEN), grpc.StatusCode.OUT_OF_RANGE)
    # 64 MiB of token ids (id 1, one byte each), encoded by hand.
    n = 64 << 20
    inner = b"\x0a" + varint(n) + b"\x01" * n              # TokenIds.ids, packed
    big = b"\x1a" + varint(len(inner)) + inner             # GenerateRequest.tokens
    del inner
    expect("64 MiB message", big, grpc.StatusCode.RESOURCE_EXHAUSTED, raw=True, timeout=60)
    del big
    expect("malformed protobuf bytes", b"\xff\xff\xff", IA, raw=True)
    # A NUL byte in a string field would be cut by protobuf-c's C strings:
    # refused, naming the field, in a prompt and in a nested repeated field.
    r = pb.GenerateRequest(text="Once upon\x00 a time")
    r.sampling.max_tokens = 8
    expect("NUL byte in text", r, IA, "text: ")
    r = samp()
    r.sampling.stop.extend(["zz", "a\x00b"])
    expect("NUL byte in sampling.stop[1]", r, IA, "sampling.stop: ")
    try:
        api.tokenize(pb.TokenizeRequest(text="a\x00b"), timeout=5)
        report("6 bad request: Tokenize NUL byte in text -> INVALID_ARGUMENT naming 'text'", False,
               "OK")
    except grpc.RpcError as e:
        report("6 bad request: Tokenize NUL byte in text -> INVALID_ARGUMENT naming 'text'",
               e.code() == IA and e.details().startswith("text: "),
               "%s %r" % (code_name(e.code()), e.details()))
    r = greedy_req(TOKEN_PROMPT, 8)
    r.policy.attention.kind = pb.AttentionPolicy.BLOCK_SPARSE
    r.policy.attention.top_k_blocks = 0
    expect("policy.attention.top_k_blocks 0", r, IA, "top_k_blocks")
    r = greedy_req(TOKEN_PROMPT, 8)
    r.policy.attention.kind = pb.AttentionPolicy.DENSE
    r.policy.attention.gamma = 16
    expect("policy.attention.gamma with DENSE", r, IA, "policy.attention.gamma")
    r = greedy_req(TOKEN_PROMPT, 8)
    r.policy.attention.kind = pb.AttentionPolicy.DELTA
    r.policy.attention.window_tokens = 0
    expect("policy.attention.window_tokens 0", r, IA, "window_tokens")
    # Sparse prefill policies run (their quality is kvserve eval's business).
    for kind in ("SINK_WINDOW", "DELTA", "BLOCK_SPARSE"):
        r = greedy_req(TOKEN_PROMPT * 20, 8)
        r.policy.attention.kind = getattr(pb.AttentionPolicy, kind)
        r.policy.attention.sink_tokens = 4
        r.policy.attention.window_tokens = 16
        if kind == "DELTA":
            r.policy.attention.gamma = 16
        if kind == "BLOCK_SPARSE":
            r.policy.attention.top_k_blocks = 2
        o = collect(api, r, timeout=30)
        report("6 policy.attention.kind %s generates" % kind,
               o["code"] is None and len(o["tokens"]) == 8, describe(o))
        dens = o["usage"].attention_density if o["usage"] is not None else None
        report("6 policy.attention.kind %s reports its attention density < 1" % kind,
               dens is not None and 0 < dens < 1, "density %s" % dens)
    o = collect(api, greedy_req(TOKEN_PROMPT * 20, 8), timeout=30)
    dens = o["usage"].attention_density if o["usage"] is not None else None
    report("6 a dense request reports attention density 1", dens == 1.0, "density %s" % dens)
    # Quest at decode: covering every block is dense decoding; one block
    # besides the row's own runs; past the model length is refused naming
    # the field.
    dense = collect(api, greedy_req(TOKEN_PROMPT * 20, 24), timeout=30)
    outs = {}
    for k in (1, 1000):
        r = greedy_req(TOKEN_PROMPT * 20, 24)
        r.policy.attention.decode_top_k_blocks = k
        outs[k] = collect(api, r, timeout=30)
    report("6 policy.attention.decode_top_k_blocks covering every block gives dense "
           "decoding's tokens", outs[1000]["code"] is None and dense["code"] is None
           and outs[1000]["tokens"] == dense["tokens"] and len(dense["tokens"]) == 24,
           "%s vs dense %s" % (describe(outs[1000]), describe(dense)))
    report("6 policy.attention.decode_top_k_blocks 1 generates", outs[1]["code"] is None
           and len(outs[1]["tokens"]) == 24, describe(outs[1]))
    r = greedy_req(TOKEN_PROMPT, 8)
    r.policy.attention.decode_top_k_blocks = 1 << 20
    expect("policy.attention.decode_top_k_blocks past the model length", r, IA,
           "policy.attention.decode_top_k_blocks")
    # Speculative prefill (server-main runs with the bundled draft model).
    r = greedy_req(TOKEN_PROMPT, 8)
    r.policy.prefill.kind = pb.PrefillPolicy.SPECULATIVE
    r.policy.prefill.keep_ratio = 0.0
    expect("policy.prefill.keep_ratio 0", r, IA, "policy.prefill.keep_ratio")
    r = greedy_req(TOKEN_PROMPT, 8)
    r.policy.prefill.kind = pb.PrefillPolicy.FULL
    r.policy.prefill.look_ahead = 4
    expect("policy.prefill.look_ahead with FULL", r, IA, "policy.prefill.look_ahead")
    r = greedy_req(TOKEN_PROMPT * 40, 8)
    r.policy.prefill.kind = pb.PrefillPolicy.SPECULATIVE
    r.policy.prefill.keep_ratio = 0.25
    o = collect(api, r, timeout=30)
    u = o["usage"]
    n = len(TOKEN_PROMPT) * 40
    report("6 policy.prefill.kind SPECULATIVE generates",
           o["code"] is None and len(o["tokens"]) == 8, describe(o))
    # A prefix-cache hit (earlier requests share this prompt's start) is kept
    # whole and not computed again.
    report("6 SPECULATIVE reports the kept prompt tokens and the draft's time",
           u is not None and 0 < u.kept_prompt_tokens < n and
           u.computed_prompt_tokens + u.cached_prompt_tokens == u.kept_prompt_tokens and
           u.draft_time_us > 0,
           "usage %s" % (u,))
    # The bundled model carries no chat template: chat is refused, not guessed.
    r = pb.GenerateRequest()
    r.chat.messages.add(role="user", content="Hi")
    r.sampling.max_tokens = 8
    expect("chat without a chat template in the model", r, IA, "chat template")
    for path in ("/kvserve.v1.Generation/NoSuchMethod", "/kvserve.v1.NoSuchService/Generate"):
        t0 = time.monotonic()
        try:
            api.ch.unary_unary(path)(b"", timeout=10)
            code, details = None, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        dt = time.monotonic() - t0
        report("6 unknown method %s -> UNIMPLEMENTED at once" % path,
               code == grpc.StatusCode.UNIMPLEMENTED and dt < 2,
               "got %s %r after %.2f s" % (code_name(code), details, dt))
        good_after(api, "an unknown method")
    idle, ld = wait_idle(api)
    report("6 after the bad requests every KV block is free", idle, load_str(ld))


def scrape(port, path="/metrics", method="GET"):
    """Returns (HTTP status, content type, body text)."""
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), ""


def parse_metrics(text):
    """{series: value} for every sample line ('name{labels}' as written)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def histogram_problems(text, m):
    """Every histogram: ascending le, cumulative counts, +Inf == _count."""
    bad = []
    names = [ln.split()[2] for ln in text.splitlines()
             if ln.startswith("# TYPE ") and ln.split()[3] == "histogram"]
    for n in names:
        pre = n + '_bucket{le="'
        les = [(k[len(pre):-2], v) for k, v in m.items() if k.startswith(pre)]
        if not les or les[-1][0] != "+Inf":
            bad.append("%s: no final +Inf bucket" % n)
            continue
        bounds = [float(le) for le, _ in les[:-1]]
        counts = [v for _, v in les]
        if bounds != sorted(bounds) or counts != sorted(counts):
            bad.append("%s: buckets not ascending/cumulative" % n)
        if counts[-1] != m.get(n + "_count"):
            bad.append("%s: +Inf %s != _count %s" % (n, counts[-1], m.get(n + "_count")))
    return names, bad


def check_metrics(server, api):
    """Two greedy requests move the counters and histograms by exactly
    what they were; the gauges agree with GetLoad once idle."""
    name = "9 metrics"
    if server.metrics_port is None:
        report(name, False, "the server printed no 'kvserve: metrics on' line")
        return
    st, _, before_text = scrape(server.metrics_port)
    if st != 200:
        report(name, False, "first scrape: HTTP %d" % st)
        return
    before = parse_metrics(before_text)
    outs = [collect(api, greedy_req(p, max_tokens=8)) for p in ("metrics one", "metrics two!")]
    if any(o["code"] is not None or o["usage"] is None for o in outs):
        report(name, False, "requests failed: %s" % [describe(o) for o in outs])
        return
    idle, ld = wait_idle(api)
    st, ctype, text = scrape(server.metrics_port)
    m = parse_metrics(text)
    errs = []
    if st != 200 or not ctype.startswith("text/plain; version=0.0.4"):
        errs.append("HTTP %d, Content-Type %r" % (st, ctype))

    def delta(k):
        return m.get(k, float("nan")) - before.get(k, 0.0)
    ntok = sum(len(o["tokens"]) for o in outs)
    nprompt = sum(o["usage"].prompt_tokens for o in outs)
    if delta("kvserve_generation_tokens_total") < ntok:
        errs.append("generation tokens +%s < %d received"
                    % (delta("kvserve_generation_tokens_total"), ntok))
    if delta("kvserve_prompt_tokens_total") != nprompt:
        errs.append("prompt tokens +%s != %d" % (delta("kvserve_prompt_tokens_total"), nprompt))
    if delta('kvserve_request_success_total{finished_reason="length"}') != 2:
        errs.append("length finishes +%s != 2"
                    % delta('kvserve_request_success_total{finished_reason="length"}'))
    for h in ("kvserve_e2e_request_latency_seconds", "kvserve_time_to_first_token_seconds",
              "kvserve_request_queue_time_seconds", "kvserve_time_per_output_token_seconds",
              "kvserve_attention_density"):
        if delta(h + "_count") != 2:
            errs.append("%s_count +%s != 2" % (h, delta(h + "_count")))
    if m.get("kvserve_prefix_cache_hits_total", -1) > m.get("kvserve_prefix_cache_queries_total",
                                                            -1):
        errs.append("prefix cache hits > queries")
    if delta("kvserve_prefix_cache_queries_total") < nprompt - 2:
        errs.append("prefix cache queries +%s < %d"
                    % (delta("kvserve_prefix_cache_queries_total"), nprompt - 2))
    if delta("kvserve_engine_steps_total") < 8 or delta("kvserve_engine_busy_seconds_total") <= 0:
        errs.append("engine steps/busy did not move")
    if idle and not isinstance(ld, str):
        if (m.get("kvserve_num_requests_running") != 0
                or m.get("kvserve_kv_blocks_capacity") != ld.kv_blocks_total
                or m.get("kvserve_kv_blocks_free") != ld.kv_blocks_free):
            errs.append("gauges disagree with GetLoad (%s)" % load_str(ld))
    names, bad = histogram_problems(text, m)
    errs += bad
    if len(names) != 6:
        errs.append("%d histogram families, want 6" % len(names))
    if not text.endswith("\n"):
        errs.append("no trailing newline")
    st404 = scrape(server.metrics_port, "/nope")[0]
    st405 = scrape(server.metrics_port, method="POST")[0]
    if (st404, st405) != (404, 405):
        errs.append("/nope -> %d, POST -> %d" % (st404, st405))
    report(name, not errs, "; ".join(errs) if errs else
           "%d series, +%d generation tokens, histograms consistent" % (len(m), ntok))
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool", "`promtool check metrics`")
        return
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    report("9 promtool check metrics", r.returncode == 0,
           (r.stdout + r.stderr).strip()[-400:])


def missing_tool(tool, what):
    """Prometheus's tools come with scripts/setup.sh; CI must have them."""
    if os.environ.get("CI"):
        report("9 %s is installed" % tool, False, "%s not on PATH, so %s cannot run" % (tool, what))
    else:
        print("NOTE: %s is not on PATH; %s not run" % (tool, what))


def prom_query(port, expr):
    """The result vector of an instant query to a Prometheus on loopback."""
    url = "http://127.0.0.1:%d/api/v1/query?query=%s" % (port, urllib.parse.quote(expr))
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.load(r)
    return doc["data"]["result"] if doc.get("status") == "success" else None


def check_prometheus(server, work):
    """Debian's Prometheus scrapes the running server: the target is up and
    a query over kvserve's series answers what /metrics says."""
    name = "9 prometheus scrapes the server"
    prom = shutil.which("prometheus")
    if prom is None:
        missing_tool("prometheus", "the Prometheus scrape")
        return
    if server.metrics_port is None:
        report(name, False, "no metrics port")
        return
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        web = sk.getsockname()[1]
    d = os.path.join(work, "prometheus")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    cfg = os.path.join(d, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                "scrape_configs:\n  - job_name: kvserve\n    static_configs:\n"
                "      - targets: ['127.0.0.1:%d']\n" % server.metrics_port)
    log = open(os.path.join(d, "log"), "w")
    p = subprocess.Popen([prom, "--config.file=" + cfg, "--storage.tsdb.path=" + d + "/tsdb",
                          "--web.listen-address=127.0.0.1:%d" % web, "--log.level=warn"],
                         stdout=log, stderr=subprocess.STDOUT)
    OTHERS.append(p)
    why, got = "", {}
    try:
        deadline = time.time() + 40
        while time.time() < deadline:
            time.sleep(0.5)
            if p.poll() is not None:
                why = "prometheus exited %d" % p.returncode
                break
            try:
                up = prom_query(web, 'up{job="kvserve"}')
                cap = prom_query(web, "kvserve_kv_blocks_capacity")
                ttft = prom_query(web, "kvserve_time_to_first_token_seconds_count")
            except (OSError, ValueError, KeyError):
                continue  # not listening yet
            if up and up[0]["value"][1] == "1" and cap and ttft:
                got = {"capacity": float(cap[0]["value"][1]),
                       "ttft_count": float(ttft[0]["value"][1])}
                break
        else:
            why = "no successful scrape within 40 s"
    finally:
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
    m = parse_metrics(scrape(server.metrics_port)[2]) if got else {}
    if got and (got["capacity"] != m.get("kvserve_kv_blocks_capacity")
                or got["ttft_count"] <= 0):
        why = "queried %s, /metrics says capacity %s" % (got, m.get("kvserve_kv_blocks_capacity"))
    if why:
        with open(os.path.join(d, "log")) as f:
            why += "; log: " + f.read()[-300:]
    report(name, not why, why or "up=1, kv_blocks_capacity %.0f, TTFT count %.0f" % (
        got["capacity"], got["ttft_count"]))


def check_sigterm(server, api):
    """Health Watch sees SERVING then NOT_SERVING; in-flight streams finish
    OK; a new call during the drain gets UNAVAILABLE; exit status 0."""
    statuses = []
    watch_end = {}
    got_serving = threading.Event()
    got_not = threading.Event()

    def watcher():
        try:
            for r in api.watch(hpb.HealthCheckRequest(service=""), timeout=180):
                statuses.append(r.status)
                if r.status == hpb.HealthCheckResponse.SERVING:
                    got_serving.set()
                if r.status == hpb.HealthCheckResponse.NOT_SERVING:
                    got_not.set()
            watch_end["code"] = None
        except grpc.RpcError as e:
            watch_end["code"] = e.code()
    wt = threading.Thread(target=watcher, daemon=True)
    wt.start()
    got_serving.wait(5)
    # A Watch of a service the server lacks: SERVICE_UNKNOWN, stream kept
    # open until the shutdown ends it OK; and more watchers, whose last
    # sends may complete as the server shuts down.
    others = [{"statuses": [], "code": "open"} for _ in range(7)]

    def other_watcher(k):
        svc = "no.such.Service" if k == 0 else ""
        try:
            for r in api.watch(hpb.HealthCheckRequest(service=svc), timeout=180):
                others[k]["statuses"].append(r.status)
            others[k]["code"] = None
        except grpc.RpcError as e:
            others[k]["code"] = e.code()
        others[k]["t_end"] = time.monotonic()
    ots = [threading.Thread(target=other_watcher, args=(k,), daemon=True)
           for k in range(len(others))]
    for t in ots:
        t.start()

    streams = [None] * 4
    first = [threading.Event() for _ in streams]

    def streamer(i):
        out = {"code": None, "details": "", "tokens": 0, "finish": None}
        try:
            for r in api.generate(greedy_req(TOKEN_PROMPT + [65 + i], DRAIN_MAX_TOKENS),
                                  timeout=150, metadata=api.md):
                out["tokens"] += len(r.token_ids)
                first[i].set()
                if r.HasField("finish_reason"):
                    out["finish"] = r.finish_reason
        except grpc.RpcError as e:
            out["code"], out["details"] = e.code(), e.details()
        first[i].set()
        streams[i] = out
    sts = [threading.Thread(target=streamer, args=(i,), daemon=True) for i in range(len(streams))]
    for t in sts:
        t.start()
    for e in first:
        e.wait(10)
    live_at_term = sum(1 for s in streams if s is None)
    server.proc.send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    got_not.wait(5)
    # A new call during the drain.
    o = collect(api, greedy_req(TOKEN_PROMPT, 4), timeout=10)
    still_live = sum(1 for s in streams if s is None)
    for t in sts:
        t.join(timeout=150)
    try:
        rc = server.proc.wait(timeout=150)
    except subprocess.TimeoutExpired:
        rc = "still running %.0f s after SIGTERM" % (time.monotonic() - t_term)
    wt.join(timeout=5)
    for t in ots:
        t.join(timeout=5)

    unknown = others[0]
    report("5 health Watch of an unknown service: SERVICE_UNKNOWN, open until the shutdown",
           unknown["statuses"] == [hpb.HealthCheckResponse.SERVICE_UNKNOWN]
           and unknown["code"] is None and unknown.get("t_end", 0) >= t_term,
           "saw %s, ended with %s %.2f s after SIGTERM" % (
               unknown["statuses"], unknown["code"], unknown.get("t_end", 0) - t_term))
    names = [hpb.HealthCheckResponse.ServingStatus.Name(s) for s in statuses]
    report("5 health Watch: SERVING, then NOT_SERVING after SIGTERM",
           got_serving.is_set() and got_not.is_set()
           and statuses.index(hpb.HealthCheckResponse.SERVING)
           < statuses.index(hpb.HealthCheckResponse.NOT_SERVING),
           "Watch saw %s, ended with %s" % (names, code_name(watch_end.get("code"))))
    bad = []
    for i, s in enumerate(streams):
        if s is None:
            bad.append("stream %d never ended" % i)
        elif s["code"] is not None or s["finish"] != pb.FINISH_REASON_LENGTH \
                or s["tokens"] != DRAIN_MAX_TOKENS:
            bad.append("stream %d: status %s %r, finish %s, %d/%d tokens"
                       % (i, code_name(s["code"]), s["details"], finish_name(s["finish"]),
                          s["tokens"], DRAIN_MAX_TOKENS))
    report("5 SIGTERM: streams in flight complete OK", live_at_term > 0 and not bad,
           ("; ".join(bad) if bad else "all %d complete" % len(streams))
           + " (%d in flight at SIGTERM)" % live_at_term)
    # GOAWAY at the drain's start: a new connection is refused (a client
    # balancing over several servers takes the call elsewhere).  A call
    # racing the GOAWAY on the old connection is refused by the server.
    fresh = None
    for _ in range(20):
        ch2 = grpc.insecure_channel(server.addr)
        fresh = collect(Api(ch2), greedy_req(TOKEN_PROMPT, 4), timeout=10)
        ch2.close()
        if "shutting down" not in (fresh["details"] or ""):
            break
        time.sleep(0.1)
    report("5 SIGTERM: a new connection during the drain is refused",
           fresh["code"] == grpc.StatusCode.UNAVAILABLE
           and "shutting down" not in (fresh["details"] or ""), describe(fresh))
    report("5 SIGTERM: a new Generate during the drain -> UNAVAILABLE",
           o["code"] == grpc.StatusCode.UNAVAILABLE,
           "got %s (%d streams still in flight when it was sent)" % (describe(o), still_live))
    report("5 SIGTERM: the server exits with status 0", rc == 0, "exit %s" % rc)


def check_auth(kvserve, model, work):
    key = "kvs-test-key-0123456789"
    kf = os.path.join(work, "api-key")
    with open(kf, "w") as f:
        f.write(key + "\n")
    os.chmod(kf, 0o600)
    srv = start_server(kvserve, model, work, "server-auth", ["--api-key-file", kf])
    ch = grpc.insecure_channel(srv.addr)
    try:
        api = Api(ch)
        UA = grpc.StatusCode.UNAUTHENTICATED
        for what, md in (("no key", []), ("a wrong key", [("authorization", "Bearer nope")]),
                         ("a key without Bearer", [("authorization", key)])):
            o = collect(api, greedy_req(TOKEN_PROMPT, 4), timeout=10, metadata=md)
            report("7 auth: Generate with %s -> UNAUTHENTICATED" % what, o["code"] == UA,
                   describe(o))
        try:
            api.get_load(pb.GetLoadRequest(), timeout=5)
            code = None
        except grpc.RpcError as e:
            code = e.code()
        report("7 auth: Control/GetLoad without a key -> UNAUTHENTICATED", code == UA,
               "got %s" % code_name(code))
        good = [("authorization", "Bearer " + key)]
        o = collect(api, greedy_req(TOKEN_PROMPT, 8), timeout=15, metadata=good)
        report("7 auth: Generate with the right key works", o["code"] is None
               and len(o["tokens"]) == 8, describe(o) + " (key file ends with a newline)")
        check_health(api, "7 auth: without a key,")
        c_health(kvserve, srv.addr, "7 auth: without a key,")
        got, info = c_client(kvserve, srv.addr, TOKEN_PROMPT, 8, ["--api-key-file", kf])
        report("7 auth: C client with --api-key-file works", got is not None and len(got) == 8,
               "" if got is not None and len(got) == 8 else str(info))
    finally:
        ch.close()
        srv.kill()


def check_chat_template(kvserve, model, work):
    """--chat-template gives a model without one (the bundled model) a
    family: chat requests are rendered with it, and greedy answers equal
    those to the rendered text sent as token ids."""
    srv = start_server(kvserve, model, work, "server-chat", ["--chat-template", "chatml"])
    ch = grpc.insecure_channel(srv.addr)
    try:
        api = Api(ch)
        mi = api.model_info(pb.GetModelInfoRequest(), timeout=5)
        report("8 chat: GetModelInfo names the --chat-template family",
               mi.chat_template == "chatml", "chat_template %r" % mi.chat_template)
        msgs = [("system", "Be brief."), ("user", "The grass is"), ("assistant", " green."),
                ("user", "The sky is")]
        r = pb.GenerateRequest()
        for role, content in msgs:
            r.chat.messages.add(role=role, content=content)
        r.sampling.temperature = 0.0
        r.sampling.max_tokens = 12
        r.sampling.ignore_eos = True
        o = collect(api, r, timeout=30)
        text = "".join("<|im_start|>%s\n%s<|im_end|>\n" % m for m in msgs)
        text += "<|im_start|>assistant\n"
        want = collect(api, greedy_req(list(text.encode()), 12), timeout=30)
        u = o["usage"]
        tk = pb.TokenizeRequest()
        for role, content in msgs:
            tk.chat.messages.add(role=role, content=content)
        tok_ids = list(api.tokenize(tk, timeout=5).ids)
        report("8 chat: Tokenize(chat) gives the ids Generate runs (the ChatML text's bytes)",
               tok_ids == list(text.encode()), "%d ids, first %s" % (len(tok_ids), tok_ids[:8]))
        tk.text = "both"
        try:
            api.tokenize(tk, timeout=5)
            report("8 chat: Tokenize with text and chat -> INVALID_ARGUMENT", False, "OK")
        except grpc.RpcError as e:
            report("8 chat: Tokenize with text and chat -> INVALID_ARGUMENT",
                   e.code() == grpc.StatusCode.INVALID_ARGUMENT and "text and chat" in e.details(),
                   "%s %s" % (e.code().name, e.details()))
        report("8 chat: a conversation renders as ChatML (prompt tokens and greedy answer "
               "as for the rendered text)",
               o["code"] is None and want["code"] is None and u is not None
               and u.prompt_tokens == len(text.encode()) and o["tokens"] == want["tokens"]
               and len(o["tokens"]) == 12,
               "%s, prompt_tokens %s (want %d); rendered-text answer: %s"
               % (describe(o), u.prompt_tokens if u else None, len(text.encode()),
                  describe(want)))
        r = pb.GenerateRequest()
        r.chat.messages.add(role="user", content="a")
        r.chat.messages.add(role="system", content="b")
        r.sampling.max_tokens = 4
        o = collect(api, r, timeout=10)
        report("8 chat: a system message after the first -> INVALID_ARGUMENT naming it",
               o["code"] == grpc.StatusCode.INVALID_ARGUMENT
               and "messages[1].role" in o["details"], describe(o))
        path = os.path.join(work, "dataset-chat.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps({"messages": [{"role": m[0], "content": m[1]} for m in msgs],
                                "output_len": 6}) + "\n")
        rc, out, doc = run_bench_json(kvserve, srv.addr, work, "chat", [
            "--dataset", path, "--num-requests", "2"])
        report("8 chat: bench --dataset renders \"messages\" entries with the template",
               rc == 0 and doc is not None and all(
                   r["prompt_tokens"] == len(text.encode()) and r["output_tokens"] == 6
                   for r in doc["requests"]) and len(doc["requests"]) == 2,
               "exit %d: %s" % (rc, [(r["prompt_tokens"], r["output_tokens"])
                                     for r in doc["requests"]] if doc else out[-300:]))
        ok, last = wait_idle(api)
        report("8 chat: every KV block free afterwards", ok, str(last))
    finally:
        ch.close()
        srv.kill()


def check_spec_decode(kvserve, model, work, draft=None, rejection=False):
    """--num-speculative-tokens: a server that speculates by prompt lookup
    (or, given a draft model, by the draft's continuation), drawing
    on two threads, streams the outputs `kvserve run` gives without either
    (greedy, and a seeded draw under top-p), reports the proposals in usage
    and GetServerInfo, and frees every block.  With rejection sampling
    (the draft's proposals drawn from its distribution) the seeded draw is
    `kvserve run`'s with the same flags: a lone request's schedule, and so
    its draws, are the same."""
    method = "draft" if draft else "ngram"
    acceptance = "rejection" if rejection else "exact" if draft else ""
    # Draws on two threads (the engine thread and one more) as well.
    flags = ["--num-speculative-tokens", "4", "--sample-threads", "2"]
    spec = ["--num-speculative-tokens", "4", "--speculative-method", "draft",
            "--speculative-acceptance", "rejection", "--draft-model", draft] if rejection else []
    flags += ["--speculative-method", "draft", "--draft-model", draft] if draft else \
        ["--prompt-lookup-min", "1"]
    if rejection:
        flags += ["--speculative-acceptance", "rejection"]
        method += ", rejection"
    srv = start_server(kvserve, model, work, "server-spec-" + method.replace(", ", "-"), flags)
    ch = grpc.insecure_channel(srv.addr)
    T = "10 spec decode (%s): " % method
    try:
        api = Api(ch)
        info = api.server_info(pb.GetServerInfoRequest(), timeout=5)
        report(T + "GetServerInfo reports num_speculative_tokens, the method and acceptance",
               info.num_speculative_tokens == 4
               and info.speculative_method == ("draft" if draft else "ngram")
               and info.speculative_acceptance == acceptance,
               "num_speculative_tokens %d, method %r, acceptance %r"
               % (info.num_speculative_tokens, info.speculative_method,
                  info.speculative_acceptance))
        prompt = "The grass is green. The sky is blue. The sun is yellow. The grass is"
        o = collect(api, greedy_req(prompt, 48), timeout=30)
        want = run_reference(kvserve, model, prompt, 48)
        u = o["usage"]
        report(T + "greedy output == run's without it, proposals accepted",
               o["code"] is None and o["tokens"] == want["tokens"] and u is not None
               and u.HasField("spec_draft_tokens") and u.spec_accepted_tokens > 0
               and u.spec_accepted_tokens <= u.spec_draft_tokens,
               "%s; run %d tokens; spec %s of %s accepted"
               % (describe(o), len(want["tokens"]), u.spec_accepted_tokens if u else None,
                  u.spec_draft_tokens if u else None))
        r = greedy_req(prompt, 32)
        r.sampling.temperature = 0.8
        r.sampling.top_p = 0.9
        r.sampling.seed = 1234
        o = collect(api, r, timeout=30)
        cmd = [kvserve, "run", "--model", model, "--temperature", "0.8", "--top-p", "0.9",
               "--seed", "1234", "--ignore-eos", "--max-tokens", "32", "--json",
               "--prompt", prompt] + ENGINE_FLAGS + spec
        ref = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        ref_ids = json.loads(ref.stdout)["tokens"] if ref.returncode == 0 else None
        report(T + ("a seeded top-p draw == run's with the same flags" if rejection else
                    "a seeded top-p draw == run's without it"),
               o["code"] is None and o["tokens"] == ref_ids,
               "%s; run exit %d" % (describe(o), ref.returncode))
        # Seeded draws under rejection sampling: the proposals drawn from
        # the draft's distributions, beside each other and forked samples.
        draws = ["--temperature", "1", "--top-p", "0.95"] if rejection else []
        rc, out, doc = run_bench_json(kvserve, srv.addr, work,
                                      "spec-" + method.replace(", ", "-"),
                                      ["--num-requests", "6", "--concurrency", "3",
                                       "--input-len", "96", "--output-len", "48", "--n", "2"]
                                      + draws)
        sm = doc["summary"] if doc else {}
        cf = doc["config"] if doc else {}
        report(T + "kvserve bench sums the outputs' proposals and acceptances",
               rc == 0 and sm.get("spec_draft_tokens", 0) > 0
               and cf.get("temperature") == (1 if rejection else 0)
               and 0 < sm.get("spec_accepted_tokens", 0) <= sm["spec_draft_tokens"]
               and "Speculative tokens accepted:" in out,
               "exit %d, draft %s, accepted %s" % (rc, sm.get("spec_draft_tokens"),
                                                   sm.get("spec_accepted_tokens")))
        ok, last = wait_idle(api)
        report(T + "every KV block free afterwards", ok, load_str(last))
    finally:
        ch.close()
        srv.kill()


def check_defaults(kvserve, model, work):
    """The engine flags are all optional: the server must come up without
    --num-kv-blocks / --kv-cache-memory and the rest."""
    flags = ["--max-model-len", "512"]
    try:
        srv = start_server(kvserve, model, work, "server-defaults", flags=flags)
    except RuntimeError as e:
        return report("0 serve starts with default engine flags (only %s)" % " ".join(flags),
                      False, str(e).replace("\n", " | "))
    ch = grpc.insecure_channel(srv.addr)
    try:
        o = collect(Api(ch), greedy_req(TOKEN_PROMPT, 8), timeout=15)
        report("0 serve starts with default engine flags (only %s) and generates"
               % " ".join(flags), o["code"] is None and len(o["tokens"]) == 8, describe(o))
        r = greedy_req(TOKEN_PROMPT, 8)
        r.policy.prefill.kind = pb.PrefillPolicy.SPECULATIVE
        o = collect(Api(ch), r, timeout=15)
        report("0 SPECULATIVE without --draft-model -> FAILED_PRECONDITION naming the field",
               o["code"] == grpc.StatusCode.FAILED_PRECONDITION and
               "policy.prefill.kind" in (o["details"] or ""), describe(o))
    finally:
        ch.close()
        srv.kill()


def check_no_prefix_cache(kvserve, model, work):
    """Without --enable-prefix-caching nothing is shared, and a request
    that asks for prefix reuse is refused rather than quietly served
    without it; on a q8_0 cache, SnapKV/H2O keep budgets far past its
    few full-precision blocks (what they keep is written quantized)."""
    srv = start_server(kvserve, model, work, "server-no-prefix",
                       flags=["--max-model-len", "512", "--no-enable-prefix-caching",
                              "--kv-cache-dtype", "q8_0", "--max-num-seqs", "1",
                              "--max-num-batched-tokens", "64"])
    ch = grpc.insecure_channel(srv.addr)
    try:
        api = Api(ch)
        outs = [collect(api, greedy_req(TOKEN_PROMPT * 4, 4), timeout=15) for _ in range(2)]
        report("0 --no-enable-prefix-caching: a repeated prompt is computed again",
               all(o["code"] is None and o["usage"] is not None
                   and o["usage"].cached_prompt_tokens == 0 for o in outs),
               "; ".join(describe(o) for o in outs))
        for reuse, want in ((True, grpc.StatusCode.FAILED_PRECONDITION), (False, None)):
            r = greedy_req(TOKEN_PROMPT * 4, 4)
            r.policy.kv.prefix_reuse = reuse
            o = collect(api, r, timeout=15)
            report("0 --no-enable-prefix-caching: policy.kv.prefix_reuse %s -> %s" %
                   (reuse, code_name(want)), o["code"] == want and
                   (want is None or "policy.kv.prefix_reuse" in (o["details"] or "")),
                   describe(o))
        # A quantized cache of 8 full-precision blocks (128 tokens): SnapKV
        # and H2O compact a 440-token prompt to budgets past them, and
        # write what they keep quantized past the residual window; a
        # budget under one block (the sinks' block alone) keeps it all
        # full precision.
        for kind in ("SNAPKV", "H2O"):
            for budget, dropped in ((400, 40), (64, 376), (8, 432), (1 << 20, 0)):
                r = greedy_req(TOKEN_PROMPT * 40, 4)
                r.policy.kv.kind = getattr(pb.KvPolicy, kind)
                r.policy.kv.budget_tokens = budget
                if budget == 8:
                    r.policy.kv.window_tokens = 4
                o = collect(api, r, timeout=30)
                got = o["usage"].kv_dropped_tokens if o["usage"] else None
                # H2O drops decode tokens too; SnapKV only the prompt's.
                ok = (o["code"] is None and len(o["tokens"]) == 4 and got is not None and
                      (got == dropped if kind == "SNAPKV" else got >= dropped))
                report("0 q8_0 KV: policy.kv %s budget_tokens %d -> OK, %s dropped" %
                       (kind, budget, got), ok, describe(o))
    finally:
        ch.close()
        srv.kill()


def check_early_sigterm(kvserve, model, work):
    """SIGTERM as soon as "listening on" is printed, and a second one on
    its heels, still end in a clean exit 0 (the signals are caught from
    then on, and through the teardown)."""
    rcs = []
    for k in range(6):
        srv = start_server(kvserve, model, work, "server-term-%d" % k,
                           flags=["--max-model-len", "256"])
        srv.proc.send_signal(signal.SIGTERM)
        if k % 2:
            time.sleep(0.002 * k)
            if srv.proc.poll() is None:
                srv.proc.send_signal(signal.SIGTERM)
        try:
            rcs.append(srv.proc.wait(timeout=30))
        except subprocess.TimeoutExpired:
            rcs.append("hung")
            srv.kill()
    report("5 SIGTERM right after 'listening on' (and twice) -> exit 0 every time",
           rcs == [0] * len(rcs), "exit statuses %s" % rcs)
    # A port already taken: a message and exit 1, not a hang.
    srv = start_server(kvserve, model, work, "server-port", flags=["--max-model-len", "256"])
    try:
        port = srv.addr.rsplit(":", 1)[1]
        r = subprocess.run([kvserve, "serve", "--model", model, "--max-model-len", "256",
                            "--port", port], capture_output=True, text=True, timeout=60)
        out = (r.returncode, r.stderr.strip().splitlines()[-1:] if r.stderr else [])
    except subprocess.TimeoutExpired:
        out = ("hung", [])
    finally:
        srv.kill()
    report("5 serve on a port in use -> 'cannot listen', exit 1",
           out[0] == 1 and out[1] and "cannot listen" in out[1][0], "exit %s, %s" % out)


def check_preempt_log(kvserve, model, work):
    """A pool too small for the load preempts to the host tier (sizes given
    with units); the server's log names the preempted requests by their
    request_id, and every request still completes."""
    flags = ENGINE_FLAGS + ["--num-kv-blocks", "40", "--max-num-seqs", "8",
                            "--host-kv-memory", "1Mi"]
    srv = start_server(kvserve, model, work, "server-preempt", flags=flags)
    try:
        # 40 blocks of 16 hold 640 tokens: more can never fit, and the
        # refusal says so with the numbers.
        ch = grpc.insecure_channel(srv.addr)
        o = collect(Api(ch), greedy_req(TOKEN_PROMPT, 700), timeout=15)
        ch.close()
        report("6 prompt + max_tokens past the whole KV cache -> RESOURCE_EXHAUSTED with sizes",
               o["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED
               and "+ 700 new tokens can never fit in the KV cache (640 tokens)"
               in (o["details"] or ""), describe(o))
        rc, out, doc = run_bench_json(kvserve, srv.addr, work, "preempt", [
            "--num-requests", "6", "--concurrency", "6", "--input-len", "64",
            "--output-len", "128"])
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=60)
        with open(srv.log_path, errors="replace") as f:
            log = f.read()
        named = re.findall(r"sched: request (\S+) preempted, \d+ KV entries swapped", log)
        ok = (rc == 0 and doc is not None and doc["summary"]["completed"] == 6 and named
              and all(re.fullmatch(r"req-\d+", n) for n in named))
        report("6 preemption to the host tier: the log names requests by request_id", ok,
               "exit %d, %s preempted: %s" % (rc, len(named), named[:4] or out[-300:]))
    finally:
        srv.kill()


def check_queue_full(kvserve, model, work):
    """--max-num-seqs 1 --max-queued-requests 1: one running, one queued, the
    third gets RESOURCE_EXHAUSTED."""
    flags = ENGINE_FLAGS + ["--num-kv-blocks", "1024", "--max-num-seqs", "1",
                            "--max-queued-requests", "1"]
    srv = start_server(kvserve, model, work, "server-queue", flags=flags)
    ch = grpc.insecure_channel(srv.addr)
    api = Api(ch)
    calls = []
    try:
        a = api.generate(greedy_req(TOKEN_PROMPT, LONG_MAX_TOKENS), timeout=60)
        calls.append(a)
        next(a)                       # running
        b = api.generate(greedy_req(TOKEN_PROMPT + [65], LONG_MAX_TOKENS), timeout=60)
        calls.append(b)
        end, ld = time.monotonic() + 3, None
        while time.monotonic() < end:
            ld = api.load()
            if ld.queued >= 1:
                break
            time.sleep(0.01)
        o = collect(api, greedy_req(TOKEN_PROMPT, 4), timeout=10)
        report("6 queue full (1 running, 1 queued, limit 1) -> RESOURCE_EXHAUSTED",
               o["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED,
               "%s; load before it: %s" % (describe(o), load_str(ld) if ld else "?"))
        for c in calls:
            c.cancel()
        idle, ld = wait_idle(api)
        o = collect(api, greedy_req(TOKEN_PROMPT, 4), timeout=10)
        report("6 after the queue drains a request is admitted again",
               idle and o["code"] is None and len(o["tokens"]) == 4,
               "%s; %s" % (describe(o), load_str(ld)))
    except grpc.RpcError as e:
        report("6 queue full", False, "%s %s" % (e.code().name, e.details()))
    finally:
        for c in calls:
            c.cancel()
        ch.close()
        srv.kill()


def make_certs(work):
    d = os.path.join(work, "tls")
    os.makedirs(d, exist_ok=True)
    ext = os.path.join(d, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n")
    p = lambda n: os.path.join(d, n)   # noqa: E731
    cmds = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=kvserve test CA", "-keyout", p("ca.key"), "-out", p("ca.pem")],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-keyout", p("server.key"), "-out", p("server.csr")],
        ["openssl", "x509", "-req", "-in", p("server.csr"), "-CA", p("ca.pem"),
         "-CAkey", p("ca.key"), "-CAcreateserial", "-days", "2", "-extfile", ext,
         "-out", p("server.pem")],
    ]
    for c in cmds:
        r = subprocess.run(c, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("%s failed: %s" % (" ".join(c[:3]), r.stderr.strip()[-300:]))
    return p("ca.pem"), p("server.pem"), p("server.key")


def check_tls(kvserve, model, work):
    if shutil.which("openssl") is None:
        skip("8 TLS", "openssl is not installed")
        return
    try:
        ca, cert, key = make_certs(work)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        report("8 TLS: certificates", False, str(e))
        return
    srv = start_server(kvserve, model, work, "server-tls", ["--tls-cert", cert, "--tls-key", key])
    with open(ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    tch = grpc.secure_channel(srv.addr, creds,
                              options=[("grpc.ssl_target_name_override", "localhost")])
    pch = grpc.insecure_channel(srv.addr)
    try:
        o = collect(Api(tch), greedy_req(TOKEN_PROMPT, 8), timeout=15)
        report("8 TLS: a TLS Python client streams", o["code"] is None and len(o["tokens"]) == 8,
               describe(o))
        tls = ["--tls-ca", ca, "--tls-server-name", "localhost"]
        got, info = c_client(kvserve, srv.addr, TOKEN_PROMPT, 8, tls)
        report("8 TLS: the C client with --tls-ca streams", got is not None and len(got) == 8,
               "" if got is not None and len(got) == 8 else str(info))
        c_health(kvserve, srv.addr, "8 TLS:", tls)
        o = collect(Api(pch), greedy_req(TOKEN_PROMPT, 8), timeout=10)
        report("8 TLS: a plaintext client -> UNAVAILABLE",
               o["code"] == grpc.StatusCode.UNAVAILABLE, describe(o))
        o = collect(Api(tch), greedy_req(TOKEN_PROMPT, 8), timeout=15)
        report("8 TLS: the server still streams after the plaintext attempt",
               o["code"] is None and len(o["tokens"]) == 8, describe(o))
    finally:
        tch.close()
        pch.close()
        srv.kill()
    # The other way round: a TLS client against a plaintext server.
    plain = start_server(kvserve, model, work, "server-plain", [])
    tch = grpc.secure_channel(plain.addr, creds,
                              options=[("grpc.ssl_target_name_override", "localhost")])
    pch = grpc.insecure_channel(plain.addr)
    try:
        o = collect(Api(tch), greedy_req(TOKEN_PROMPT, 8), timeout=10)
        report("8 TLS: a TLS client against a plaintext port -> UNAVAILABLE",
               o["code"] == grpc.StatusCode.UNAVAILABLE, describe(o))
        o = collect(Api(pch), greedy_req(TOKEN_PROMPT, 8), timeout=15)
        report("8 TLS: the plaintext server still streams after the TLS attempt",
               o["code"] is None and len(o["tokens"]) == 8, describe(o))
    finally:
        tch.close()
        pch.close()
        plain.kill()


# --------------------------------------------------------------------------


def main():
    global grpc, pb, hpb
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    kvserve, work = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    model = sys.argv[3] if len(sys.argv) > 3 else os.path.join(ROOT, "weights",
                                                               "kvserve-main.gguf")
    try:
        import grpc as _grpc
        grpc = _grpc
    except ImportError:
        print("SKIP: grpcio is not importable by %s (Debian: python3-grpcio)" % sys.executable)
        return 77
    if shutil.which("protoc") is None:
        print("SKIP: protoc is not installed (Debian: protobuf-compiler)")
        return 77
    if not os.path.exists(model):
        print("SKIP: no model at %s" % model)
        return 77
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        pb, hpb = gen_protos(work)
    except ImportError as e:
        print("SKIP: the protobuf Python runtime is missing: %s" % e)
        return 77

    # A watchdog: never outlive ctest's timeout with servers left behind.
    def watchdog():
        print("FAIL: the test ran past %d s; killing the servers" % TOTAL_BUDGET_S, flush=True)
        for proc in [s.proc for s in SERVERS] + OTHERS:
            try:
                proc.kill()
            except OSError:
                pass
        os._exit(1)
    dog = threading.Timer(TOTAL_BUDGET_S, watchdog)
    dog.daemon = True
    dog.start()

    t0 = time.monotonic()
    try:
        draft = os.path.join(ROOT, "weights", "kvserve-draft.gguf")
        srv = start_server(kvserve, model, work, "server-main",
                           ["--draft-model", draft, "--metrics-port", "0"])
        print("server: %s (%s)" % (srv.addr, " ".join(srv.cmd[1:])), flush=True)
        ch = grpc.insecure_channel(srv.addr)
        api = Api(ch)
        try:
            mi = check_info(api, model)
            vocab = getattr(mi, "n_vocab", 0) or 259
            check_health(api)
            c_health(kvserve, srv.addr, "5")
            refs = check_greedy(api, kvserve, model, srv.addr)
            check_logprobs(api, kvserve, model, work, srv.addr)
            check_penalties(api, kvserve, model)
            check_min_tokens(api)
            check_samples(api, kvserve, srv.addr)
            check_logit_bias(api, kvserve, srv.addr)
            check_prompt_logprobs(api, kvserve, srv.addr)
            check_allowed_and_truncate(api, kvserve, srv.addr)
            check_guided_choice(api, kvserve, srv.addr)
            check_guided_regex_json(api, kvserve, srv.addr, work)
            check_guided_grammar(api, kvserve, srv.addr, work)
            check_include_stop(api, kvserve, srv.addr)
            if "text" in refs:
                check_tokenize(api, refs["text"])
            check_concurrent(api)
            check_bench(kvserve, srv.addr, work)
            check_bench_dataset(api, kvserve, srv.addr, work)
            check_cancel_deadline(api)
            check_abort(api)
            check_stop_after_silent_token(api)
            check_bad_requests(api, vocab)
            check_metrics(srv, api)
            check_prometheus(srv, work)
            check_sigterm(srv, api)
        finally:
            ch.close()
            if any(not ok for _, ok, _ in results):
                print("server-main stderr (tail):\n" + srv.log_tail(25))
        check_defaults(kvserve, model, work)
        check_no_prefix_cache(kvserve, model, work)
        check_early_sigterm(kvserve, model, work)
        check_queue_full(kvserve, model, work)
        check_preempt_log(kvserve, model, work)
        check_auth(kvserve, model, work)
        check_chat_template(kvserve, model, work)
        check_spec_decode(kvserve, model, work)
        check_spec_decode(kvserve, model, work, draft)
        check_spec_decode(kvserve, model, work, draft, rejection=True)
        check_tls(kvserve, model, work)
    except Exception as e:  # a broken setup is a failure, not a crash
        import traceback
        traceback.print_exc()
        report("setup", False, "%s: %s" % (type(e).__name__, e))
    finally:
        for s in SERVERS:
            s.kill()
        dog.cancel()
    fails = [n for n, ok, _ in results if not ok]
    print("%d passed, %d failed (%.1f s)" % (len(results) - len(fails), len(fails),
                                             time.monotonic() - t0))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
