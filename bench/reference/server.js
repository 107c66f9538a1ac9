/**
 * The Node reference for Droid's benchmark: what the NestJS + socket.io service did, on socket.io 4
 * with its defaults (perMessageDeflate off), and nothing more.
 *
 *   - namespace /events; the JWT (HS256, JWT_SECRET) from the handshake's auth.token, else the
 *     Authorization header, else the `token` query parameter; refusals carry Droid's messages
 *     ("Authentication required", "Token expired", "Invalid token", data.code 401); any other
 *     namespace is refused with "Invalid namespace"; at most 20 sockets per user;
 *   - each socket joins `user:{id}` (task events) and `sockets:{id}` (connection counts), receives
 *     `connected`, and the user's sockets receive `connections.count`, again on disconnect;
 *   - `ping`, `subscribe.tasks`, `unsubscribe.tasks`, answered to the sender (and to its ack);
 *   - task events are the envelope {event, data, timestamp, seq} emitted to `user:{id}` twice:
 *     as the specific event, then as `task.event`.
 *
 * Bench-only HTTP routes on the same port (Droid's bench launcher, bench/droid_server.py, has the
 * same three):
 *   POST /bench/emit  {count, users, start?, rate?, event?, stamp?}: emits `count` envelopes to
 *                     the rooms user:bench-user-{(start + i) % users}, as fast as possible (rate 0)
 *                     or paced at `rate` per second; data.sentAt is the emit time on
 *                     CLOCK_MONOTONIC in ms. With stamp "due" (and a rate), data.sentAt is moved
 *                     back by how late the event left its pace beyond TIMER_SLACK_MS (a loop too
 *                     busy to emit on time counts in the latency), and the emit time is in
 *                     data.publishedAt. Answers {emitted, elapsedMs, maxLagMs} once all are
 *                     emitted.
 *   GET  /bench/stats {sockets, engineSockets, gc: {count, totalMs, maxMs}} (?reset=1 zeroes gc)
 *   POST /bench/gc    a full garbage collection (node --expose-gc), answers {ok}
 *
 * Environment: PORT (0 = any free port), HOST (127.0.0.1), JWT_SECRET; BENCH_NODE_MODULES, the
 * directory whose node_modules provide socket.io and jsonwebtoken (default: this one's; the
 * second reference, ../reference-native, adds ws's native helpers bufferutil and utf-8-validate
 * there). Prints `BENCH-READY port=<port> pid=<pid> native=<bufferutil+utf-8-validate|none>` on
 * stdout once listening; exits on SIGTERM/SIGINT.
 */
"use strict";

const http = require("http");
const { PerformanceObserver } = require("perf_hooks");
const path = require("path");
const { createRequire } = require("module");
const load = process.env.BENCH_NODE_MODULES
  ? createRequire(path.join(path.resolve(process.env.BENCH_NODE_MODULES), "package.json"))
  : require;
const { Server } = load("socket.io");
const jwt = load("jsonwebtoken");

// Which of ws's optional native helpers ws itself will load (it requires them from its own place).
function nativeHelpers() {
  const fromWs = createRequire(load.resolve("ws"));
  const found = ["bufferutil", "utf-8-validate"].filter((name) => {
    try { fromWs(name); return !process.env.WS_NO_BUFFER_UTIL; } catch { return false; }
  });
  return found.length ? found.join("+") : "none";
}

const NAMESPACE = "/events";
const MAX_SOCKETS_PER_USER = 20;
const RATE_PER_SECOND = 20;
const CONNECTED_MESSAGE = "Successfully connected to real-time events";
const secret = process.env.JWT_SECRET;
if (!secret) {
  console.error("server.js: JWT_SECRET is required");
  process.exit(2);
}

const monoMs = () => Number(process.hrtime.bigint()) / 1e6;
const nowIso = () => new Date().toISOString();

// garbage-collection pauses, for /bench/stats
const gcStats = { count: 0, totalMs: 0, maxMs: 0 };
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) {
    gcStats.count += 1;
    gcStats.totalMs += entry.duration;
    if (entry.duration > gcStats.maxMs) gcStats.maxMs = entry.duration;
  }
}).observe({ entryTypes: ["gc"] });

// ---------------------------------------------------------------------------------------------
// the /events namespace

function refusal(message, code = 401) {
  const err = new Error(message);
  err.data = { code };
  return err;
}

function bearer(value) {
  if (typeof value !== "string") return null;
  let v = value.trim();
  if (v.slice(0, 7).toLowerCase() === "bearer ") v = v.slice(7).trim();
  return v || null;
}

function tokenFrom(handshake) {
  const auth = handshake.auth;
  if (auth && auth.token !== undefined && auth.token !== null) {
    return typeof auth.token === "string" ? bearer(auth.token) : "";
  }
  const header = bearer(handshake.headers.authorization);
  if (header) return header;
  return bearer(handshake.query && handshake.query.token);
}

const userSockets = new Map(); // userId -> Set of socket ids

function countOf(userId) {
  const set = userSockets.get(userId);
  return set ? set.size : 0;
}

const httpServer = http.createServer(benchRoutes);
const io = new Server(httpServer, { cors: { origin: "*" } });
const events = io.of(NAMESPACE);

io.use((socket, next) => next(new Error("Invalid namespace"))); // the main namespace "/"

events.use((socket, next) => {
  const token = tokenFrom(socket.handshake);
  if (!token) return next(refusal("Authentication required"));
  let claims;
  try {
    claims = jwt.verify(token, secret, { algorithms: ["HS256"] });
  } catch (err) {
    return next(refusal(err.name === "TokenExpiredError" ? "Token expired" : "Invalid token"));
  }
  if (typeof claims.sub !== "string" || !claims.sub || typeof claims.exp !== "number") {
    return next(refusal("Invalid token"));
  }
  if (countOf(claims.sub) >= MAX_SOCKETS_PER_USER) {
    return next(refusal("Too many connections", 429));
  }
  socket.data.userId = claims.sub;
  socket.data.tokens = RATE_PER_SECOND;
  socket.data.stamp = Date.now();
  next();
});

function admit(socket) {
  const now = Date.now();
  const d = socket.data;
  d.tokens = Math.min(RATE_PER_SECOND, d.tokens + ((now - d.stamp) / 1000) * RATE_PER_SECOND);
  d.stamp = now;
  if (d.tokens >= 1) {
    d.tokens -= 1;
    return true;
  }
  socket.emit("error", { message: "Rate limit exceeded" });
  return false;
}

function answer(socket, event, payload, ack) {
  socket.emit(event, payload);
  if (typeof ack === "function") ack(payload);
}

events.on("connection", (socket) => {
  const userId = socket.data.userId;
  let set = userSockets.get(userId);
  if (!set) userSockets.set(userId, (set = new Set()));
  set.add(socket.id);
  socket.join(`user:${userId}`);
  socket.join(`sockets:${userId}`);
  socket.emit("connected", {
    clientId: socket.id, userId, timestamp: nowIso(), message: CONNECTED_MESSAGE,
  });
  events.to(`sockets:${userId}`).emit("connections.count", { count: set.size });

  socket.on("disconnect", () => {
    const s = userSockets.get(userId);
    if (s) {
      s.delete(socket.id);
      if (s.size === 0) userSockets.delete(userId);
    }
    events.to(`sockets:${userId}`).emit("connections.count", { count: countOf(userId) });
  });

  socket.on("ping", (data, ack) => {
    if (typeof data === "function") [data, ack] = [undefined, data];
    if (!admit(socket)) return;
    const message = data && typeof data.message === "string" ? data.message : "pong";
    answer(socket, "pong", { timestamp: nowIso(), clientId: socket.id, message: message.slice(0, 1000) }, ack);
  });
  socket.on("subscribe.tasks", (data, ack) => {
    if (typeof data === "function") [data, ack] = [undefined, data];
    if (!admit(socket)) return;
    socket.join(`user:${userId}`);
    answer(socket, "subscribed.tasks", {
      userId, timestamp: nowIso(), message: "Successfully subscribed to task updates",
    }, ack);
  });
  socket.on("unsubscribe.tasks", (data, ack) => {
    if (typeof data === "function") [data, ack] = [undefined, data];
    if (!admit(socket)) return;
    socket.leave(`user:${userId}`);
    answer(socket, "unsubscribed.tasks", {
      userId, timestamp: nowIso(), message: "Successfully unsubscribed from task updates",
    }, ack);
  });
});

// ---------------------------------------------------------------------------------------------
// bench-only routes

const TASK_ID = "6f1c2e7a-0000-4000-8000-00000000beef";
// Timers fire up to ~1 ms off their time in either runtime (libuv counts whole ms, asyncio rounds
// epoll's timeout up): lateness up to this much is the timer's, not a busy loop's (as in
// bench/droid_server.py).
const TIMER_SLACK_MS = 1.0;
const AGENT_ID = "00000000-0000-4000-8000-000000000001";

/** One task event, built the way a publisher builds it, delivered to the owner's room twice. */
function emitOne(i, users, start, event, lateMs) {
  const userId = `bench-user-${(start + i) % users}`;
  const now = nowIso();
  const data = {
    taskId: TASK_ID, userId, agentId: AGENT_ID, status: "processing", retryCount: 0,
    startedAt: now, updatedAt: now, i, sentAt: monoMs(),
  };
  if (lateMs !== undefined) {
    data.publishedAt = data.sentAt;
    data.sentAt -= Math.max(0, lateMs - TIMER_SLACK_MS);
  }
  const envelope = { event, data, timestamp: now, seq: null };
  const room = `user:${userId}`;
  events.to(room).emit(event, envelope);
  events.to(room).emit("task.event", envelope);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function emitMany({ count = 1, users = 1, start = 0, rate = 0, event = "task.processing", stamp }) {
  const t0 = monoMs();
  let maxLagMs = 0;
  if (!rate) {
    for (let i = 0; i < count; i++) emitOne(i, users, start, event);
  } else {
    const interval = 1000 / rate;
    for (let i = 0; i < count; i++) {
      const due = t0 + i * interval;
      const wait = due - monoMs();
      if (wait > 0) await sleep(wait);
      const lag = monoMs() - due;
      if (lag > maxLagMs) maxLagMs = lag;
      emitOne(i, users, start, event, stamp === "due" ? lag : undefined);
    }
  }
  return { emitted: count, elapsedMs: monoMs() - t0, maxLagMs };
}

function reply(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text) });
  res.end(text);
}

function benchRoutes(req, res) {
  const url = new URL(req.url, "http://localhost");
  if (req.method === "GET" && url.pathname === "/bench/stats") {
    const body = {
      sockets: events.sockets.size,
      engineSockets: io.engine.clientsCount,
      gc: { ...gcStats },
    };
    if (url.searchParams.get("reset")) Object.assign(gcStats, { count: 0, totalMs: 0, maxMs: 0 });
    return reply(res, 200, body);
  }
  if (req.method === "POST" && url.pathname === "/bench/gc") {
    if (typeof global.gc === "function") global.gc();
    return reply(res, 200, { ok: typeof global.gc === "function" });
  }
  if (req.method === "POST" && url.pathname === "/bench/emit") {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      let params;
      try {
        params = JSON.parse(Buffer.concat(chunks).toString() || "{}");
      } catch {
        return reply(res, 400, { message: "bad JSON" });
      }
      emitMany(params).then((out) => reply(res, 200, out), (err) => reply(res, 500, { message: String(err) }));
    });
    return;
  }
  reply(res, 404, { statusCode: 404, error: "Not Found", message: "Not Found" });
}

httpServer.listen(Number(process.env.PORT || 0), process.env.HOST || "127.0.0.1", () => {
  console.log(`BENCH-READY port=${httpServer.address().port} pid=${process.pid} native=${nativeHelpers()}`);
});

function stop() {
  io.close();
  httpServer.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 3000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
