/**
 * The load generator of Droid's benchmark: one Node process of official socket.io-client 4
 * sockets (WebSocket transport, offering per-message deflate as browsers do), driving either
 * server through the same phases. bench/run.py starts it pinned to its own core.
 *
 *   node loadgen.js '<plan as JSON>'
 *
 * plan = {url, serverPid, secret, clkTck, phases: [{type, ...}]}, phase types:
 *   connect     {sockets, users, concurrency}  open sockets (socket i belongs to user i % users);
 *               time until every one has received `connected`; server RSS before and after
 *   fanout      {warmupS, durationS, chunk, windowChunks, requests}  saturation: the server emits
 *               bursts of `chunk` events (round robin over the users' rooms); a new burst is asked
 *               for while fewer than windowChunks bursts are undelivered, so the server is never
 *               idle and no queue grows without bound; delivered messages per second
 *   latency     {rate, durationS}  the server emits `rate` events a second; receive time minus
 *               data.sentAt (both CLOCK_MONOTONIC) for every delivered message
 *   disconnect  {}  close every open socket; time until the server counts none
 *   churn       {cycles, sockets, users, concurrency, settleS}  one warm-up cycle, then `cycles`
 *               cycles of connect-all / disconnect-all; server RSS before, after, after a full GC,
 *               and (settleS > 0) after waiting settleS seconds and another full GC
 *   e2e-latency {requests, sockets}  one user with `sockets` sockets: POST /tasks one at a time;
 *               time from the request to `task.created` on each of the owner's sockets
 *   e2e-throughput {tasks, users, socketsPerUser, concurrency}  POST /tasks `tasks` times
 *               (`concurrency` at once); time until every task's `task.completed` reached every
 *               socket of its owner (REST + worker + events, with the demo agent)
 *
 * Every phase reports the CPU use of the server and of this process over its measured interval,
 * so that a reader can check that the load generator was not the bottleneck. Output: one JSON
 * object per line on stdout ({type: "phase-start"|"result"|"done"|"error", ...}); logs on stderr.
 */
"use strict";

const fs = require("fs");
const http = require("http");
const { io } = require("socket.io-client");
const jwt = require("jsonwebtoken");

const plan = JSON.parse(process.argv[2]);
const base = new URL(plan.url);
const CLK_TCK = plan.clkTck || 100;
const PAGE_KB = 4;

const monoMs = () => Number(process.hrtime.bigint()) / 1e6;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const log = (...args) => process.stderr.write(`[loadgen] ${args.join(" ")}\n`);

// ---------------------------------------------------------------------------------------------
// the server process, seen from /proc

function serverRssKb() {
  const status = fs.readFileSync(`/proc/${plan.serverPid}/status`, "utf8");
  return Number(/VmRSS:\s+(\d+)/.exec(status)[1]);
}

/** [user, system] CPU seconds of the server process. */
function serverCpu() {
  const stat = fs.readFileSync(`/proc/${plan.serverPid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return [Number(fields[11]) / CLK_TCK, Number(fields[12]) / CLK_TCK]; // utime, stime
}

/** Busy CPU time in seconds: [whole machine, the server's core] (from /proc/stat). */
function machineBusyS() {
  const busy = (line) => {
    const v = line.trim().split(/\s+/).slice(1, 9).map(Number); // user nice system idle iowait irq softirq steal
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK;
  };
  const lines = fs.readFileSync("/proc/stat", "utf8").split("\n");
  const core = lines.find((l) => l.startsWith(`cpu${plan.serverCpu ?? 0} `));
  return [busy(lines[0]), core ? busy(core) : 0];
}

/** [user, system] CPU seconds of this process. */
function ownCpu() {
  const u = process.cpuUsage();
  return [u.user / 1e6, u.system / 1e6];
}

/**
 * CPU use between meter() and the call of what it returns, in % of one core: the server, this
 * process, everything else on the machine, and everything else on the server's core (the server
 * is pinned to it: what others run there is time the server may have wanted; bench/run.py flags
 * phases where that was more than a little).
 */
function meter() {
  const t0 = monoMs(), s0 = serverCpu(), l0 = ownCpu(), m0 = machineBusyS();
  return () => {
    const wall = (monoMs() - t0) / 1000;
    const pct = (s) => (wall > 0 ? (100 * s) / wall : 0);
    const s1 = serverCpu(), l1 = ownCpu(), m1 = machineBusyS();
    const serverUser = s1[0] - s0[0], serverSys = s1[1] - s0[1];
    const loadgenUser = l1[0] - l0[0], loadgenSys = l1[1] - l0[1];
    const server = serverUser + serverSys, loadgen = loadgenUser + loadgenSys;
    return {
      wallS: wall,
      serverCpuPct: pct(server),
      serverSysPct: pct(serverSys),
      loadgenCpuPct: pct(loadgen),
      loadgenSysPct: pct(loadgenSys),
      otherCpuPct: Math.max(0, pct(m1[0] - m0[0] - server - loadgen)),
      otherOnServerCpuPct: Math.max(0, pct(m1[1] - m0[1] - server)),
    };
  };
}

// ---------------------------------------------------------------------------------------------
// HTTP

const agent = new http.Agent({ keepAlive: true, maxSockets: 8 });

function request(method, path, body, headers = {}) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? null : Buffer.from(JSON.stringify(body));
    const req = http.request({
      host: base.hostname, port: base.port, method, path, agent,
      headers: { "Content-Type": "application/json", ...(data ? { "Content-Length": data.length } : {}), ...headers },
    }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => {
        const text = Buffer.concat(chunks).toString();
        let parsed = text;
        try { parsed = JSON.parse(text); } catch { /* not JSON */ }
        resolve({ status: res.statusCode, body: parsed });
      });
    });
    req.setTimeout(120000, () => req.destroy(new Error(`${method} ${path} timed out`)));
    req.on("error", reject);
    if (data) req.write(data);
    req.end();
  });
}

const stats = async (reset = false) => (await request("GET", `/bench/stats${reset ? "?reset=1" : ""}`)).body;

/** Poll /bench/stats until pred(stats) holds; returns the last stats. */
async function waitStats(pred, timeoutMs = 60000, what = "server state") {
  const deadline = monoMs() + timeoutMs;
  for (;;) {
    const s = await stats();
    if (pred(s)) return s;
    if (monoMs() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(s)}`);
    await sleep(20);
  }
}

// ---------------------------------------------------------------------------------------------
// sockets

const tokens = new Map();
function tokenFor(userId) {
  let t = tokens.get(userId);
  if (!t) {
    t = jwt.sign({ sub: userId }, plan.secret, { algorithm: "HS256", expiresIn: "1d" });
    tokens.set(userId, t);
  }
  return t;
}

const userName = (i) => `bench-user-${i}`;

// counters shared by every socket's listeners
const counter = { received: 0, byEvent: Object.create(null) };
let latencies = null; // Float64Array while a latency phase records
let latencyCount = 0;
let onProgress = null; // called every 64 messages while a fan-out phase waits
let open = []; // sockets of the current population
let deflateOffered = null;
let deflateNegotiated = 0;

function onTaskMessage(name) {
  return (envelope) => {
    counter.received += 1;
    counter.byEvent[name] = (counter.byEvent[name] || 0) + 1;
    if (latencies !== null && latencyCount < latencies.length) {
      latencies[latencyCount++] = monoMs() - envelope.data.sentAt;
    }
    if (onProgress !== null && (counter.received & 63) === 0) onProgress();
  };
}
const onProcessing = onTaskMessage("task.processing");
const onEvent = onTaskMessage("task.event");

/**
 * The "frames" receiver: during a fan-out phase, read each WebSocket's TCP stream directly and
 * count the Engine.IO message frames in it, instead of decoding every one through ws,
 * engine.io-client and socket.io-client (every 1,024th frame is decoded and checked). Decoding
 * costs the client about as much CPU per message as sending costs the server, so a single
 * load-generator core that decoded everything would become the bottleneck instead of the
 * server under test. Frames that are not plain text messages (Engine.IO pings, close frames,
 * compressed frames) go to the library's own receiver, which handles them as usual. Sockets are
 * switched over, and back, only while their receiver holds no partial frame. Returns a function
 * that restores the library's reading.
 */
const frameCheck = { checked: 0, bad: 0 };
function countFrames(sockets) {
  const undo = [];
  let sampled = 0;
  for (const socket of sockets) {
    const ws = socket.io.engine.transport.ws;
    const tcp = ws._socket;
    const receiver = ws._receiver;
    if (!tcp || !receiver || receiver._bufferedBytes !== 0) continue; // leave it to the library
    const libraryListeners = tcp.listeners("data");
    let pending = null;
    const onData = (chunk) => {
      const buf = pending ? Buffer.concat([pending, chunk]) : chunk;
      pending = null;
      let off = 0;
      for (;;) {
        const left = buf.length - off;
        if (left < 2) break;
        const b0 = buf[off];
        let len = buf[off + 1] & 0x7f;
        let header = 2;
        if (len === 126) {
          if (left < 4) break;
          len = buf.readUInt16BE(off + 2);
          header = 4;
        } else if (len === 127) {
          if (left < 10) break;
          len = Number(buf.readBigUInt64BE(off + 2));
          header = 10;
        }
        if (left < header + len) break;
        // FIN, no RSV bits, text opcode, payload starting with "4" (an Engine.IO message)
        if (b0 === 0x81 && len > 0 && buf[off + header] === 0x34) {
          if ((++sampled & 1023) === 0) checkFrame(buf.toString("utf8", off + header, off + header + len));
          onFrame();
        } else {
          receiver.write(Buffer.from(buf.subarray(off, off + header + len)));
        }
        off += header + len;
      }
      if (off < buf.length) pending = Buffer.from(buf.subarray(off));
    };
    for (const l of libraryListeners) tcp.removeListener("data", l);
    tcp.on("data", onData);
    undo.push(async () => {
      for (let i = 0; pending && i < 500; i++) await sleep(10);
      tcp.removeListener("data", onData);
      for (const l of libraryListeners) tcp.on("data", l);
      if (pending) receiver.write(pending); // a partial frame: the library takes it from here
    });
  }
  return async () => { for (const u of undo) await u(); };
}

function checkFrame(text) {
  frameCheck.checked += 1;
  const body = text.startsWith("42/events,") ? JSON.parse(text.slice(10)) : null;
  if (!body || (body[0] !== "task.processing" && body[0] !== "task.event") || typeof body[1].data.sentAt !== "number") {
    frameCheck.bad += 1;
  }
}

function onFrame() {
  counter.received += 1;
  if (onProgress !== null && (counter.received & 63) === 0) onProgress();
}

function openSocket(userId, extra = {}) {
  return new Promise((resolve, reject) => {
    const socket = io(`${plan.url}/events`, {
      transports: ["websocket"],
      forceNew: true,
      reconnection: false,
      timeout: 30000,
      auth: { token: tokenFor(userId) },
      perMessageDeflate: { threshold: 1024 }, // what browsers do: offer permessage-deflate
    });
    const timer = setTimeout(() => { socket.close(); reject(new Error("no `connected` within 30 s")); }, 30000);
    socket.on("task.processing", onProcessing);
    socket.on("task.event", onEvent);
    for (const [name, fn] of Object.entries(extra)) socket.on(name, fn);
    socket.once("connect_error", (err) => { clearTimeout(timer); socket.close(); reject(err); });
    socket.once("connected", () => {
      clearTimeout(timer);
      const ws = socket.io.engine && socket.io.engine.transport && socket.io.engine.transport.ws;
      if (ws) {
        if (deflateOffered === null) deflateOffered = true;
        if (ws.extensions && ws.extensions.includes("permessage-deflate")) deflateNegotiated += 1;
      }
      resolve(socket);
    });
  });
}

/** Open n sockets, at most `concurrency` handshakes at a time; socket i belongs to user i % users. */
async function openMany(n, users, concurrency, extra) {
  const sockets = new Array(n);
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const i = next++;
      sockets[i] = await openSocket(userName(i % users), extra);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, worker));
  return sockets;
}

async function closeAll(sockets, expectRemaining = 0) {
  for (const s of sockets) s.disconnect();
  return waitStats((s) => s.sockets === expectRemaining && s.engineSockets === expectRemaining,
    60000, `${expectRemaining} sockets after disconnect`);
}

// ---------------------------------------------------------------------------------------------
// phases

const phases = {
  async connect({ sockets, users, concurrency = 100 }) {
    await waitStats((s) => s.sockets === open.length);
    const rssBefore = serverRssKb();
    const m = meter();
    const t0 = monoMs();
    const made = await openMany(sockets, users, concurrency);
    const connectS = (monoMs() - t0) / 1000;
    const usage = m();
    open = open.concat(made);
    await waitStats((s) => s.sockets === open.length, 60000, `${open.length} sockets`);
    const rssAfter = serverRssKb();
    return {
      sockets, users, concurrency, connectS, connectsPerS: sockets / connectS,
      rssBeforeKb: rssBefore, rssAfterKb: rssAfter, rssPerSocketKb: (rssAfter - rssBefore) / sockets,
      deflateNegotiated, ...usage,
    };
  },

  async fanout({ warmupS = 1, durationS = 5, chunk = 250, windowChunks = 8, requests = 2, drainS = 30, receiver = "full" }) {
    const users = plan.users;
    const restore = receiver === "frames" ? countFrames(open) : async () => {};
    const perEvent = 2 * (open.length / users); // the specific event + task.event, to each socket
    const perChunk = chunk * perEvent;
    const first = counter.received;
    let asked = 0; // events asked for
    let outstanding = 0; // trigger requests not yet answered
    let cursor = 0;
    let serverEmitMs = 0;
    let wake = null;
    const poke = () => { if (wake) { const w = wake; wake = null; w(); } };
    onProgress = poke;
    const t0 = monoMs();
    const measureFrom = t0 + warmupS * 1000;
    const measureTo = measureFrom + durationS * 1000;
    let m = null, r0 = 0, usage = null, r1 = 0, tFrom = 0, tTo = 0;
    const phase0 = monoMs();
    await stats(true);
    for (;;) {
      const now = monoMs();
      if (m === null && now >= measureFrom) { m = meter(); r0 = counter.received; tFrom = now; }
      if (now >= measureTo) { usage = m(); r1 = counter.received; tTo = now; break; }
      const behind = asked * perEvent - (counter.received - first);
      if (outstanding < requests && behind < windowChunks * perChunk) {
        outstanding += 1;
        const start = cursor;
        cursor = (cursor + chunk) % users;
        asked += chunk;
        request("POST", "/bench/emit", { count: chunk, users, start }).then((res) => {
          outstanding -= 1;
          serverEmitMs += res.body.elapsedMs;
          poke();
        }, (err) => { log("emit failed:", err.message); outstanding -= 1; poke(); });
        continue;
      }
      await new Promise((resolve) => { wake = resolve; setTimeout(poke, 5); });
    }
    onProgress = null;
    const expected = asked * perEvent;
    const drainDeadline = monoMs() + drainS * 1000;
    while ((outstanding > 0 || counter.received - first < expected) && monoMs() < drainDeadline) await sleep(10);
    await restore();
    const gc = (await stats(true)).gc;
    gc.overS = (monoMs() - phase0) / 1000;
    return {
      receiver, badFrames: frameCheck.bad, checkedFrames: frameCheck.checked,
      sockets: open.length, users, chunk, windowChunks, msgsPerS: (r1 - r0) / ((tTo - tFrom) / 1000),
      eventsAsked: asked, expectedMsgs: expected, receivedMsgs: counter.received - first,
      lostMsgs: expected - (counter.received - first), serverEmitMs, gc, ...usage,
    };
  },

  async latency({ rate = 500, durationS = 10, drainS = 10 }) {
    const users = plan.users;
    const perEvent = 2 * (open.length / users);
    const count = Math.round(rate * durationS);
    const expected = count * perEvent;
    const first = counter.received;
    latencies = new Float64Array(expected);
    latencyCount = 0;
    await stats(true);
    const m = meter();
    const res = await request("POST", "/bench/emit", { count, users, start: 0, rate });
    const deadline = monoMs() + drainS * 1000;
    while (counter.received - first < expected && monoMs() < deadline) await sleep(5);
    const usage = m();
    const gc = (await stats(true)).gc;
    const sample = latencies.subarray(0, latencyCount).slice().sort();
    latencies = null;
    const pct = (p) => (sample.length ? sample[Math.min(sample.length - 1, Math.floor((p / 100) * sample.length))] : null);
    return {
      sockets: open.length, users, rate, durationS, samples: sample.length,
      lostMsgs: expected - (counter.received - first),
      p50Ms: pct(50), p90Ms: pct(90), p99Ms: pct(99), p999Ms: pct(99.9), maxMs: sample.length ? sample[sample.length - 1] : null,
      meanMs: sample.length ? sample.reduce((a, b) => a + b, 0) / sample.length : null,
      serverMaxLagMs: res.body.maxLagMs, gc, ...usage,
    };
  },

  async disconnect() {
    const m = meter();
    const t0 = monoMs();
    const n = open.length;
    await closeAll(open);
    open = [];
    return { sockets: n, disconnectS: (monoMs() - t0) / 1000, rssAfterKb: serverRssKb(), ...m() };
  },

  async churn({ cycles = 10, sockets = 500, users = 250, concurrency = 100, settleS = 0 }) {
    const cycle = async () => closeAll(await openMany(sockets, users, concurrency));
    const rssIdle = serverRssKb();
    await cycle(); // warm-up: first-time allocations are not churn
    const rssBefore = serverRssKb();
    let rssPeak = rssBefore;
    const rssByCycleKb = [];
    const m = meter();
    const t0 = monoMs();
    for (let c = 0; c < cycles; c++) {
      const made = await openMany(sockets, users, concurrency);
      rssPeak = Math.max(rssPeak, serverRssKb());
      await closeAll(made);
      rssByCycleKb.push(serverRssKb());
    }
    const churnS = (monoMs() - t0) / 1000;
    const usage = m();
    const rssAfter = serverRssKb();
    await request("POST", "/bench/gc");
    const rssAfterGc = serverRssKb();
    let rssSettledKb = null;
    if (settleS > 0) {
      // what is released only later (timers of closed connections) is released by now
      await sleep(settleS * 1000);
      await request("POST", "/bench/gc");
      rssSettledKb = serverRssKb();
    }
    return {
      settleS, rssSettledKb, retainedSettledKb: rssSettledKb === null ? null : rssSettledKb - rssBefore,
      cycles, sockets, users, churnS, connectsPerS: (cycles * sockets) / churnS,
      rssIdleKb: rssIdle, rssBeforeKb: rssBefore, rssPeakKb: rssPeak, rssAfterKb: rssAfter, rssAfterGcKb: rssAfterGc,
      retainedKb: rssAfter - rssBefore, retainedAfterGcKb: rssAfterGc - rssBefore, rssByCycleKb, ...usage,
    };
  },

  async "e2e-latency"({ requests = 200, sockets = 2 }) {
    const userId = "bench-e2e-latency";
    const arrivals = new Map(); // taskId -> [receive times]
    let waiting = null;
    const onCreated = (env) => {
      const id = env.data.taskId;
      const list = arrivals.get(id) || [];
      list.push(monoMs());
      arrivals.set(id, list);
      if (waiting && waiting.id === id && list.length >= sockets) waiting.resolve();
    };
    const made = [];
    for (let i = 0; i < sockets; i++) made.push(await openSocket(userId, { "task.created": onCreated }));
    const auth = { Authorization: `Bearer ${tokenFor(userId)}` };
    const created = [], responses = [];
    const m = meter();
    for (let r = 0; r < requests; r++) {
      const t0 = monoMs();
      const res = await request("POST", "/tasks", { prompt: `bench task ${r}` }, auth);
      if (res.status !== 201) throw new Error(`POST /tasks answered ${res.status}: ${JSON.stringify(res.body)}`);
      responses.push(monoMs() - t0);
      const id = res.body.id;
      if ((arrivals.get(id) || []).length < sockets) {
        await new Promise((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`no task.created for ${id}`)), 10000);
          waiting = { id, resolve: () => { clearTimeout(timer); waiting = null; resolve(); } };
        });
      }
      for (const t of arrivals.get(id)) created.push(t - t0);
    }
    const usage = m();
    await closeAll(made);
    created.sort((a, b) => a - b);
    responses.sort((a, b) => a - b);
    const pct = (arr, p) => arr[Math.min(arr.length - 1, Math.floor((p / 100) * arr.length))];
    return {
      requests, sockets, createdP50Ms: pct(created, 50), createdP99Ms: pct(created, 99),
      createdMaxMs: created[created.length - 1], httpP50Ms: pct(responses, 50), httpP99Ms: pct(responses, 99),
      ...usage,
    };
  },

  async "e2e-throughput"({ tasks = 1000, users = 10, socketsPerUser = 2, concurrency = 16, timeoutS = 120 }) {
    const completions = new Map(); // taskId -> number of sockets that saw task.completed
    let done = 0;
    let finish = null;
    const counts = { "task.created": 0, "task.processing": 0, "task.completed": 0, "task.failed": 0 };
    const count = (name) => () => { counts[name] += 1; };
    const onCompleted = (env) => {
      counts["task.completed"] += 1;
      const n = (completions.get(env.data.taskId) || 0) + 1;
      completions.set(env.data.taskId, n);
      if (n === socketsPerUser) {
        done += 1;
        if (done === tasks && finish) finish();
      }
    };
    const extra = {
      "task.created": count("task.created"), "task.processing": count("task.processing"),
      "task.completed": onCompleted, "task.failed": count("task.failed"),
    };
    const made = [];
    for (let u = 0; u < users; u++) {
      for (let s = 0; s < socketsPerUser; s++) made.push(await openSocket(`bench-e2e-${u}`, extra));
    }
    const allDone = new Promise((resolve) => { finish = resolve; });
    const m = meter();
    const t0 = monoMs();
    let next = 0;
    let failedPosts = 0;
    const poster = async () => {
      while (next < tasks) {
        const i = next++;
        const user = `bench-e2e-${i % users}`;
        const res = await request("POST", "/tasks", { prompt: `bench task ${i}` }, { Authorization: `Bearer ${tokenFor(user)}` });
        if (res.status !== 201) failedPosts += 1;
      }
    };
    await Promise.all(Array.from({ length: concurrency }, poster));
    const postsS = (monoMs() - t0) / 1000;
    const timedOut = await Promise.race([allDone.then(() => false), sleep(timeoutS * 1000).then(() => true)]);
    const elapsedS = (monoMs() - t0) / 1000;
    const usage = m();
    await closeAll(made);
    return {
      tasks, users, socketsPerUser, concurrency, completedTasks: done, failedPosts, timedOut,
      postsPerS: tasks / postsS, tasksPerS: done / elapsedS, elapsedS, events: counts, ...usage,
    };
  },
};

async function main() {
  plan.users = null;
  for (const phase of plan.phases) {
    if (phase.type === "connect") plan.users = phase.users;
    out({ type: "phase-start", phase: phase.type, at: monoMs() });
    log(`${phase.type} ${JSON.stringify(phase)}`);
    const result = await phases[phase.type](phase);
    out({ type: "result", phase: phase.type, name: phase.name || phase.type, result });
  }
  out({ type: "done" });
  agent.destroy();
  process.exit(0);
}

main().catch((err) => {
  out({ type: "error", message: String(err && err.stack || err) });
  process.exit(1);
});
