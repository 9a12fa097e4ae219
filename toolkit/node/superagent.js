// superagent toolkit for Node: debug events bound to the request id the proxy gave.
//
// Theory of operation
// -------------------
// The superagent proxy gives every request an X-Request-Id; the participant captures the
// app's stdout and files every line that is a JSON object under its "request_id", which
// is how `superagent trace ID` and `superagent debug APP` put the app's events beside the
// proxy's record of the same request. This file is the app's side (docs/toolkit.md has
// the wire format, the same as the Python toolkit's):
//
// - middleware() (express, connect) and wrap(handler) (node:http) read the request's
//   x-request-id (kept when well formed: 1-200 of A-Z a-z 0-9 . _ : @ / + = -, else a
//   fresh id), echo it on the response unless the app set one, and run the rest of the
//   request inside an AsyncLocalStorage holding the id: every callback and await that
//   descends from the request sees it, and concurrent requests never see each other's.
// - emit(event, fields) writes one JSON line to stdout: ts (seconds since the epoch),
//   level (fields.level, default "info"), event, request_id (fields.request_id, else the
//   current id, else null), then the other fields. Values JSON cannot say become text
//   (BigInt, functions, symbols; an Error becomes {name, message, stack}; a cycle
//   "[Circular]"); strings keep 4096 characters, containers 100 items, nesting 8 levels;
//   a line keeps 16384 bytes (the fields that fit, in order, and "truncated": true). One
//   line is one write, so lines never interleave. emit never throws.
//
// No dependencies: node:async_hooks and node:crypto only (Node >= 14).
"use strict";

const { AsyncLocalStorage } = require("async_hooks");
const crypto = require("crypto");

const HEADER = "X-Request-Id";
const MAX_LINE = 16 * 1024;
const MAX_STRING = 4096;
const MAX_ITEMS = 100;
const MAX_DEPTH = 8;
const ENVELOPE = ["ts", "level", "event", "request_id", "truncated"];
const ELLIPSIS = "\u2026";
const WELL_FORMED = /^[A-Za-z0-9._:@/+=-]{1,200}$/;

const storage = new AsyncLocalStorage();

function wellFormed(value) {
  return typeof value === "string" && WELL_FORMED.test(value);
}

function newRequestId() {
  return crypto.randomBytes(10).toString("hex");
}

function requestIdFrom(header) {
  if (Array.isArray(header)) header = header[0];
  if (typeof header === "string") header = header.trim();
  return wellFormed(header) ? header : newRequestId();
}

function currentRequestId() {
  const id = storage.getStore();
  return id === undefined ? null : id;
}

// Run fn with requestId as the current id (work that belongs to a request but runs
// outside it: a queue consumer, a timer).
function withRequestId(requestId, fn) {
  return storage.run(requestId, fn);
}

function bind(req, res) {
  const id = requestIdFrom(req.headers && req.headers["x-request-id"]);
  if (!res.headersSent && !res.getHeader(HEADER)) res.setHeader(HEADER, id);
  req.requestId = id;
  return id;
}

// express / connect middleware: app.use(middleware())
function middleware() {
  return function superagentRequestId(req, res, next) {
    storage.run(bind(req, res), next);
  };
}

// node:http: http.createServer(wrap((req, res) => ...))
function wrap(handler) {
  return function superagentRequestId(req, res) {
    return storage.run(bind(req, res), () => handler(req, res));
  };
}

function text(value) {
  let s;
  try {
    s = typeof value === "string" ? value : String(value);
  } catch (err) {
    s = "<" + typeof value + ">";
  }
  return s.length <= MAX_STRING ? s : s.slice(0, MAX_STRING) + ELLIPSIS;
}

function clean(value, depth, seen) {
  if (value === null || typeof value === "boolean") return value;
  if (typeof value === "number") return Number.isFinite(value) ? value : String(value);
  if (typeof value === "string") return text(value);
  if (value === undefined) return null;
  if (typeof value !== "object") return text(value); // bigint, symbol, function
  if (depth >= MAX_DEPTH) return ELLIPSIS;
  if (seen.has(value)) return "[Circular]";
  seen.add(value);
  try {
    if (value instanceof Error) {
      return { name: text(value.name), message: text(value.message), stack: text(value.stack) };
    }
    if (value instanceof Date) return Number.isNaN(value.getTime()) ? "Invalid Date" : value.toISOString();
    if (Buffer.isBuffer(value)) return text(value.toString("utf8"));
    if (Array.isArray(value) || value instanceof Set) {
      const items = Array.from(value);
      const out = items.slice(0, MAX_ITEMS).map((item) => clean(item, depth + 1, seen));
      if (items.length > MAX_ITEMS) out.push("+" + (items.length - MAX_ITEMS) + " more");
      return out;
    }
    const entries = value instanceof Map ? Array.from(value.entries()) : Object.entries(value);
    const out = {};
    for (let i = 0; i < entries.length; i++) {
      if (i === MAX_ITEMS) {
        out[ELLIPSIS] = "+" + (entries.length - MAX_ITEMS) + " more";
        break;
      }
      out[text(entries[i][0])] = clean(entries[i][1], depth + 1, seen);
    }
    return out;
  } catch (err) {
    return text(value);
  } finally {
    seen.delete(value); // a value seen twice side by side is no cycle
  }
}

// The JSON line (no newline) of one event.
function encode(event, fields, options) {
  const opts = options || {};
  const given = fields && typeof fields === "object" ? fields : {};
  const level = given.level !== undefined ? given.level : "info";
  let requestId = given.request_id !== undefined ? given.request_id : opts.requestId;
  if (requestId === undefined) requestId = currentRequestId();
  const head = {
    ts: Math.round((opts.ts !== undefined ? opts.ts : Date.now() / 1000) * 1e6) / 1e6,
    level: text(level).toLowerCase(),
    event: text(event),
    request_id: requestId === null || requestId === undefined ? null : text(requestId),
  };
  const body = [];
  for (const key of Object.keys(given)) {
    if (key === "level" || key === "request_id") continue;
    const name = ENVELOPE.includes(key) ? key + "_" : key;
    body.push([name, clean(given[key], 0, new Set())]);
  }
  const line = JSON.stringify(Object.assign({}, head, Object.fromEntries(body)));
  if (Buffer.byteLength(line) <= MAX_LINE) return line;
  head.truncated = true;
  let size = Buffer.byteLength(JSON.stringify(head));
  const kept = {};
  for (const [key, value] of body) {
    const piece = Buffer.byteLength(JSON.stringify({ [key]: value })) - 1;
    if (size + piece <= MAX_LINE) {
      kept[key] = value;
      size += piece;
    }
  }
  return JSON.stringify(Object.assign(head, kept));
}

// Write one debug event to stdout: emit("cache.miss", { key, level: "debug" }).
function emit(event, fields, options) {
  try {
    process.stdout.write(encode(event, fields, options) + "\n");
  } catch (err) {
    // a debug line must never fail the request that wrote it
  }
}

module.exports = {
  HEADER,
  MAX_LINE,
  currentRequestId,
  emit,
  encode,
  middleware,
  newRequestId,
  wellFormed,
  withRequestId,
  wrap,
};
