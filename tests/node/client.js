#!/usr/bin/env node
// A second, independent client stack for kvserve's gRPC API (@grpc/grpc-js +
// @grpc/proto-loader, which parse the .proto files themselves), used by
// tests/integration/test_grpc.py.
//
//   node client.js ADDR 'GENERATE_REQUEST_JSON' [--timeout-ms N] [--api-key KEY]
//   node client.js ADDR --health [--timeout-ms N]
//
// Streams one kvserve.v1.Generation/Generate call with the request given as
// JSON (field names as in the .proto, e.g.
//   {"tokens": {"ids": [1, 2]}, "sampling": {"temperature": 0, "max_tokens": 8}})
// and prints one JSON line on stdout:
//   {"status": 0, "details": "", "tokens": [...], "text": "...",
//    "finish_reason": "FINISH_REASON_LENGTH", "request_id": "...", "messages": N}
// Exit status: 0 when the call ended OK, 1 when it ended with an error status,
// 2 on a usage error.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const ROOT = path.resolve(__dirname, '..', '..');
const PROTO_DIR = path.join(ROOT, 'proto');

function usage(msg) {
  if (msg) process.stderr.write('client.js: ' + msg + '\n');
  process.stderr.write("usage: node client.js ADDR 'REQUEST_JSON' [--timeout-ms N] [--api-key KEY]\n" +
                       '       node client.js ADDR --health [--timeout-ms N]\n');
  process.exit(2);
}

function main(argv) {
  if (argv.length < 2) usage('missing arguments');
  const addr = argv[0];
  let request = null, health = false, timeoutMs = 30000, apiKey = null;
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--health') health = true;
    else if (a === '--timeout-ms') timeoutMs = Number(argv[++i]);
    else if (a === '--api-key') apiKey = argv[++i];
    else if (request === null && !a.startsWith('--')) {
      try {
        request = JSON.parse(a);
      } catch (e) {
        usage('the request is not JSON: ' + e.message);
      }
    } else usage('unexpected argument ' + a);
  }
  if (!health && request === null) usage('no request given');
  if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) usage('bad --timeout-ms');

  const opts = {keepCase: true, longs: String, enums: String, defaults: false, oneofs: true,
                includeDirs: [PROTO_DIR]};
  const def = loader.loadSync(['kvserve/v1/kvserve.proto', 'grpc/health/v1/health.proto'], opts);
  const pkg = grpc.loadPackageDefinition(def);
  const deadline = Date.now() + timeoutMs;
  const md = new grpc.Metadata();
  if (apiKey !== null) md.set('authorization', 'Bearer ' + apiKey);

  if (health) {
    const c = new pkg.grpc.health.v1.Health(addr, grpc.credentials.createInsecure());
    c.Check({service: ''}, md, {deadline}, (err, res) => {
      const out = err ? {status: err.code, details: err.details}
                      : {status: 0, details: '', serving_status: res.status};
      process.stdout.write(JSON.stringify(out) + '\n');
      c.close();
      process.exitCode = err ? 1 : 0;
    });
    return;
  }

  const c = new pkg.kvserve.v1.Generation(addr, grpc.credentials.createInsecure());
  const out = {status: null, details: '', tokens: [], text: '', finish_reason: null,
               request_id: null, messages: 0};
  const call = c.Generate(request, md, {deadline});
  call.on('data', (r) => {
    out.messages++;
    if (r.request_id) out.request_id = r.request_id;
    for (const t of r.token_ids || []) out.tokens.push(Number(t));
    if (r.text) out.text += r.text;
    if (r.finish_reason && r.finish_reason !== 'FINISH_REASON_UNSPECIFIED')
      out.finish_reason = r.finish_reason;
    if (r.usage) out.usage = r.usage;
  });
  // Required: without an 'error' listener grpc-js throws on any non-OK status.
  call.on('error', (e) => {
    out.status = e.code;
    out.details = e.details;
  });
  // 'status' can come before the last buffered 'data' events have been
  // delivered: print once both the status and the end of the stream are in
  // (or shortly after the status if 'end' never comes, as after an error).
  let ended = false, status = null, printed = false;
  const finish = () => {
    if (printed) return;
    printed = true;
    if (out.status === null) {
      out.status = status.code;
      out.details = status.details;
    }
    process.stdout.write(JSON.stringify(out) + '\n');
    c.close();
    process.exitCode = out.status === 0 ? 0 : 1;
  };
  call.on('end', () => {
    ended = true;
    if (status !== null) finish();
  });
  call.on('status', (s) => {
    status = s;
    if (ended) finish();
    else setTimeout(finish, 300);
  });
}

main(process.argv.slice(2));
