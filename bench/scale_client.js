/**
 * One load process of bench/scale.py: a share of the idle /events sockets (rawclient.js's raw
 * client, so that the server sets the pace), driven by commands on stdin, one JSON object a line;
 * it answers each on stdout, one JSON object a line ({id, ok, ...} or {id, ok: false, error}).
 *
 *   node scale_client.js '{"port": P, "secret": S, "first": F, "count": N, "probe": false}'
 *
 * It holds the sockets F .. F+N-1 of the population; socket i belongs to user bench-user-{i/2}
 * (two sockets per user, as in bench/run.py). The server's descriptor limit is the bench's, not
 * this process's: scale.py splits the population over several of these (the hard limit is per
 * process). Commands:
 *
 *   {cmd: "connect", concurrency}   open every socket, `concurrency` handshakes at a time; answers
 *                                   {t0, t1} (CLOCK_MONOTONIC ms: first start, last `connected`)
 *   {cmd: "churn", ratePerS, durationS, maxInFlight}
 *                                   until "stop" (or for durationS at most), close ratePerS of its sockets a second (Socket.IO
 *                                   DISCONNECT + WebSocket close, as a page that goes away) and open
 *                                   each again at once for the same user, at most maxInFlight
 *                                   reconnects at a time (the rate falls to what the server and
 *                                   this process sustain); answers when every reconnect has ended:
 *                                   {started, completed, failed, doneAt: [ms of each `connected`]}
 *   {cmd: "record"}                 (probe) from now on, keep receive time - data.sentAt of every
 *                                   task.processing / task.event message (and - data.publishedAt
 *                                   when the server sends it: /bench/emit's stamp "due")
 *   {cmd: "report", expected, drainS}
 *                                   (probe) wait until `expected` messages were recorded (at most
 *                                   drainS), then answer {samples, lost, p50Ms, p90Ms, p99Ms,
 *                                   p999Ms, maxMs, fromPublish: {the same from publishedAt}}
 *   {cmd: "stop"}                   end a churn now (no answer of its own; the churn answers)
 *   {cmd: "count"}                  {open}: sockets connected now
 *
 * The probe (probe: true) holds the steady sockets whose events are timed; it never churns.
 * scale.py kills these processes with SIGKILL for the mass-drop phase.
 */
"use strict";

const readline = require("readline");
const { RawSocket, now, sign } = require("./rawclient");

const config = JSON.parse(process.argv[2]);
const { port, secret, first, count, probe = false } = config;

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const log = (...args) => process.stderr.write(`[scale-client ${first}] ${args.join(" ")}\n`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const tokens = new Map();
function tokenOf(i) {
  const user = `bench-user-${Math.floor(i / 2)}`;
  let t = tokens.get(user);
  if (!t) tokens.set(user, (t = sign(user, secret)));
  return t;
}
for (let i = first; i < first + count; i++) tokenOf(i); // signed before any clock starts

// ---------------------------------------------------------------------------------------------
// latency probe

// receive time - data.sentAt (the time the event was due: stamp "due"), and - data.publishedAt
// (when the server actually emitted it)
let samples = null; // {due, published}: Float64Arrays while recording
let nSamples = 0;
let received = 0;

function grow(a) {
  const b = new Float64Array(a.length * 2);
  b.set(a);
  return b;
}

function onMessage(text) {
  if (samples === null) return;
  const t = now();
  if (!text.startsWith('42/events,["task.')) return;
  const [name, envelope] = JSON.parse(text.slice(10));
  if (name !== "task.processing" && name !== "task.event") return;
  received += 1;
  const data = envelope && envelope.data;
  if (!data || typeof data.sentAt !== "number") return;
  if (nSamples === samples.due.length) {
    samples.due = grow(samples.due);
    samples.published = grow(samples.published);
  }
  samples.due[nSamples] = t - data.sentAt;
  samples.published[nSamples] = typeof data.publishedAt === "number" ? t - data.publishedAt : NaN;
  nSamples += 1;
}

function percentiles(values) {
  const v = values.filter((x) => !Number.isNaN(x)).sort();
  const pct = (p) => (v.length ? v[Math.min(v.length - 1, Math.floor((p / 100) * v.length))] : null);
  return { n: v.length, p50Ms: pct(50), p90Ms: pct(90), p99Ms: pct(99), p999Ms: pct(99.9),
    maxMs: v.length ? v[v.length - 1] : null };
}

// ---------------------------------------------------------------------------------------------
// the population

const slots = new Array(count).fill(null); // slot k holds socket first + k, or null
let churning = false;
const opts = probe ? { onMessage } : {};

async function open(k, attempts = 3) {
  for (let a = 1; ; a++) {
    try {
      slots[k] = await new RawSocket(port, tokenOf(first + k), opts).connect();
      return slots[k];
    } catch (err) {
      if (a >= attempts) throw err;
      log(`socket ${first + k}: ${err.message}; retrying`);
      await sleep(100 * a);
    }
  }
}

const commands = {
  async connect({ concurrency = 100 }) {
    let next = 0;
    const t0 = now();
    await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, count)) }, async () => {
      while (next < count) await open(next++);
    }));
    return { t0, t1: now(), open: openCount() };
  },

  async churn({ ratePerS, durationS, maxInFlight = 50 }) {
    const idle = []; // connected slots, oldest first: the next to go
    for (let k = 0; k < count; k++) if (slots[k] && !slots[k].closing) idle.push(k);
    const doneAt = [];
    let started = 0, failed = 0, inFlight = 0, credit = 0;
    const t0 = now();
    let last = t0;
    const end = t0 + durationS * 1000;
    const empty = [];
    const cycle = (k) => {
      started += 1;
      inFlight += 1;
      slots[k].close();
      slots[k] = null;
      new RawSocket(port, tokenOf(first + k), opts).connect().then((s) => {
        slots[k] = s;
        doneAt.push(s.t.connected);
        idle.push(k);
      }, (err) => {
        failed += 1;
        if (failed <= 5) log(`churn reconnect of socket ${first + k} failed: ${err.message}`);
        empty.push(k);
      }).finally(() => { inFlight -= 1; });
    };
    churning = true;
    while (churning && now() < end) {
      const t = now();
      // the credit is capped: a server that falls behind is not sent a burst when it catches up
      credit = Math.min(maxInFlight, credit + ((t - last) * ratePerS) / 1000);
      last = t;
      while (credit >= 1 && inFlight < maxInFlight && idle.length) {
        credit -= 1;
        cycle(idle.shift());
      }
      await sleep(5);
    }
    churning = false;
    const stoppedAt = now();
    while (inFlight > 0) await sleep(10);
    for (const k of empty) await open(k, 5); // the population is whole again (not counted)
    return { t0, stoppedAt, started, completed: doneAt.length, failed, doneAt, open: openCount() };
  },

  async record() {
    samples = { due: new Float64Array(65536), published: new Float64Array(65536) };
    nSamples = 0;
    received = 0;
    return {};
  },

  async report({ expected, drainS = 10 }) {
    const deadline = now() + drainS * 1000;
    while (received < expected && now() < deadline) await sleep(5);
    const due = percentiles(samples.due.subarray(0, nSamples));
    const published = percentiles(samples.published.subarray(0, nSamples));
    samples = null;
    return { samples: due.n, received, expected, lost: expected - received, ...due,
      fromPublish: published };
  },

  async count() {
    return { open: openCount() };
  },
};

function openCount() {
  let n = 0;
  for (const s of slots) if (s && s.connected && !s.closed && !s.closing) n += 1;
  return n;
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  if (!line.trim()) return;
  const msg = JSON.parse(line);
  if (msg.cmd === "stop") {
    churning = false;
    return;
  }
  const run = commands[msg.cmd];
  if (!run) {
    out({ id: msg.id, ok: false, error: `unknown command ${msg.cmd}` });
    return;
  }
  run(msg).then((result) => out({ id: msg.id, ok: true, ...result }),
    (err) => out({ id: msg.id, ok: false, error: String((err && err.stack) || err) }));
}).on("close", () => process.exit(0));

out({ ready: true, pid: process.pid });
