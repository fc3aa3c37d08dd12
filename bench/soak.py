#!/usr/bin/python3
"""Soak and fault test: `kvserve bench` against `kvserve serve` on loopback.

Starts the server on the given model, warms it up, then keeps --concurrency
streams (1,000) in flight for --duration seconds with a share of them
cancelled by the client and a share given short deadlines.  Meanwhile it
samples the server's RSS and /metrics.  At the end it requires:

  * no request ended other than OK or as its injected fault said
    (CANCELLED, DEADLINE_EXCEEDED);
  * nothing running or waiting, and every KV block free again
    (kvserve_kv_blocks_free == kvserve_kv_blocks_capacity);
  * the server still answers health and a generation;
  * RSS stable: at the end at most 10% + 32 MiB above the sample taken
    once the first tenth of the run has passed (pools and caches warm);
  * a clean SIGTERM exit.

Prints a summary and writes it, with the RSS samples, to --json
(default bench/out/soak.json).  Not part of CI's run: the default takes
ten minutes.  Usage:
  bench/soak.py [--build build] [--model weights/kvserve-main.gguf]
                [--duration 600] [--concurrency 1000] [--threads N]
                [--serve-flags '--num-speculative-tokens 4 ...']
                [--bench-flags '--temperature 1 ...']
"""
import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def metrics(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--model", default=os.path.join(ROOT, "weights", "kvserve-main.gguf"))
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--cancel-fraction", type=float, default=0.1)
    ap.add_argument("--deadline-fraction", type=float, default=0.1)
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "out", "soak.json"))
    ap.add_argument("--bench-flags", default="",
                    help="extra kvserve bench flags for the soak's requests")
    ap.add_argument("--serve-flags", default="",
                    help="more flags for kvserve serve (one string, split like a shell)")
    a = ap.parse_args()
    kvserve = os.path.join(a.build, "kvserve")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    work = tempfile.mkdtemp(prefix="kvserve-soak-")

    # The queue and stream limits leave room for calls the client has
    # cancelled but the server has not yet seen end: without it a
    # replacement stream could find the queue full.
    serve_cmd = [kvserve, "serve", "--model", a.model, "--host", "127.0.0.1", "--port", "0",
                 "--metrics-port", "0", "--threads", str(a.threads),
                 "--max-queued-requests", str(2 * a.concurrency),
                 "--max-concurrent-streams", str(4 * a.concurrency), "--drain-timeout", "30"]
    serve_cmd += shlex.split(a.serve_flags)
    log = open(os.path.join(work, "server.log"), "w")
    srv = subprocess.Popen(serve_cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    addr = mport = None
    t_end = time.time() + 60
    while (addr is None or mport is None) and time.time() < t_end:
        line = srv.stdout.readline()
        if not line:
            break
        m = re.match(r"kvserve: listening on (\S+)", line)
        if m:
            addr = m.group(1)
        m = re.match(r"kvserve: metrics on \S+:(\d+)", line)
        if m:
            mport = int(m.group(1))
    if addr is None or mport is None:
        print("soak: the server did not start; see %s" % log.name, file=sys.stderr)
        srv.kill()
        return 1
    result = {"config": vars(a), "serve": serve_cmd[1:], "checks": {}}
    problems = []
    try:
        result["rss_mib_idle"] = rss_mib(srv.pid)
        warm = subprocess.run([kvserve, "bench", "--addr", addr, "--num-requests", "200",
                               "--concurrency", "100", "--input-len", str(a.input_len),
                               "--output-len", str(a.output_len), "--no-progress"],
                              capture_output=True, text=True, timeout=600)
        if warm.returncode != 0:
            problems.append("warm-up bench exit %d" % warm.returncode)
        result["rss_mib_start"] = rss_mib(srv.pid)

        bench_json = os.path.join(work, "bench.json")
        # Enough requests that the duration, not the count, ends the run.
        n_req = int(max(1000, a.duration * 300))
        bench_cmd = [kvserve, "bench", "--addr", addr, "--num-requests", str(n_req),
                     "--concurrency", str(a.concurrency), "--duration", str(a.duration),
                     "--input-len", str(a.input_len), "--input-len-range", "0.5",
                     "--output-len", str(a.output_len), "--output-len-range", "0.5",
                     "--shared-prefix", "0.25", "--seed", "11",
                     "--cancel-fraction", str(a.cancel_fraction), "--cancel-after-ms", "3000",
                     "--deadline-fraction", str(a.deadline_fraction), "--deadline-ms", "8000",
                     "--json", bench_json, "--no-progress"] + shlex.split(a.bench_flags)
        result["bench"] = bench_cmd[1:]
        t0 = time.time()
        b = subprocess.Popen(bench_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        samples = []
        while b.poll() is None:
            time.sleep(min(10.0, max(1.0, a.duration / 60)))
            try:
                m = metrics(mport)
            except OSError:
                m = {}
            samples.append({"t_s": round(time.time() - t0, 1), "rss_mib": rss_mib(srv.pid),
                            "running": m.get("kvserve_num_requests_running"),
                            "waiting": m.get("kvserve_num_requests_waiting"),
                            "kv_usage": m.get("kvserve_kv_cache_usage_perc")})
            print("soak: %6.0f s  rss %7.1f MiB  running %s  waiting %s  kv %.2f" % (
                samples[-1]["t_s"], samples[-1]["rss_mib"], samples[-1]["running"],
                samples[-1]["waiting"], samples[-1]["kv_usage"] or 0.0), flush=True)
        bench_out = b.stdout.read()
        print(bench_out, end="")
        result["samples"] = samples
        if b.returncode != 0:
            problems.append("bench exit %d (requests failed other than as injected)"
                            % b.returncode)
        with open(bench_json) as f:
            doc = json.load(f)
        s = doc["summary"]
        result["summary"] = {k: s[k] for k in (
            "started", "completed", "cancelled", "deadline_exceeded", "failed", "errors",
            "duration_s", "request_throughput", "output_throughput", "max_in_flight",
            "cached_share")}
        result["summary"]["ttft_ms_p50"] = s["ttft_ms"]["p50"]
        result["summary"]["e2e_ms_p99"] = s["e2e_ms"]["p99"]

        # Idle again: nothing running or waiting, every block free.
        m = {}
        deadline = time.time() + 60
        while time.time() < deadline:
            m = metrics(mport)
            if (m.get("kvserve_num_requests_running") == 0
                    and m.get("kvserve_num_requests_waiting") == 0
                    and m.get("kvserve_kv_blocks_free") == m.get("kvserve_kv_blocks_capacity")):
                break
            time.sleep(0.5)
        result["kv_blocks_free"] = m.get("kvserve_kv_blocks_free")
        result["kv_blocks_capacity"] = m.get("kvserve_kv_blocks_capacity")
        result["preemptions"] = m.get("kvserve_num_preemptions_total")
        result["checks"]["pool_full_again"] = (
            result["kv_blocks_free"] == result["kv_blocks_capacity"]
            and m.get("kvserve_num_requests_running") == 0
            and m.get("kvserve_num_requests_waiting") == 0)
        if not result["checks"]["pool_full_again"]:
            problems.append("after the run: %s of %s KV blocks free, running %s, waiting %s" % (
                result["kv_blocks_free"], result["kv_blocks_capacity"],
                m.get("kvserve_num_requests_running"), m.get("kvserve_num_requests_waiting")))

        h = subprocess.run([kvserve, "health", "--addr", addr], capture_output=True, text=True,
                           timeout=30)
        g = subprocess.run([kvserve, "generate", "--addr", addr, "--prompt", "after the soak",
                            "--max-tokens", "8"], capture_output=True, text=True, timeout=60)
        result["checks"]["serving_after"] = h.returncode == 0 and g.returncode == 0
        if not result["checks"]["serving_after"]:
            problems.append("after the run: health exit %d, generate exit %d: %s" % (
                h.returncode, g.returncode, g.stderr.strip()[-200:]))

        result["rss_mib_end"] = rss_mib(srv.pid)
        ref = next((x["rss_mib"] for x in samples if x["t_s"] >= a.duration / 10),
                   result["rss_mib_start"])
        result["rss_mib_reference"] = ref
        result["checks"]["rss_stable"] = result["rss_mib_end"] <= ref * 1.10 + 32
        if not result["checks"]["rss_stable"]:
            problems.append("RSS grew from %.1f MiB to %.1f MiB" % (ref, result["rss_mib_end"]))
    finally:
        if srv.poll() is None:
            srv.send_signal(signal.SIGTERM)
            try:
                srv.wait(timeout=60)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
        log.close()
    result["checks"]["clean_exit"] = srv.returncode == 0
    if srv.returncode != 0:
        problems.append("server exit %d on SIGTERM" % srv.returncode)
    result["checks"]["no_unintended_errors"] = result.get("summary", {}).get("failed") == 0
    result["problems"] = problems
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)

    s = result.get("summary", {})
    print("============ kvserve soak ============")
    print("duration %.0f s, %d streams, model %s" % (a.duration, a.concurrency,
                                                     os.path.basename(a.model)))
    print("requests started %s: ok %s, cancelled %s, deadline exceeded %s, failed %s %s" % (
        s.get("started"), s.get("completed"), s.get("cancelled"), s.get("deadline_exceeded"),
        s.get("failed"), s.get("errors")))
    print("KV blocks free at the end: %s of %s (preemptions %s)" % (
        result.get("kv_blocks_free"), result.get("kv_blocks_capacity"), result.get("preemptions")))
    print("RSS MiB: idle %.1f, after warm-up %.1f, at 10%% %.1f, end %.1f" % (
        result.get("rss_mib_idle", float("nan")), result.get("rss_mib_start", float("nan")),
        result.get("rss_mib_reference", float("nan")), result.get("rss_mib_end", float("nan"))))
    print("server exit on SIGTERM: %s" % srv.returncode)
    print("soak: %d passed, %d failed" % (sum(result["checks"].values()),
                                         len(result["checks"]) - sum(result["checks"].values())))
    for p in problems:
        print("PROBLEM: " + p)
    print("server log: %s; summary: %s" % (log.name, a.json))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
