/**
 * Where a /events connection's time goes, seen from the client: a minimal raw client (no
 * socket.io-client: a few lines of framing on a TCP socket, so that the client costs little and
 * the server sets the pace) opens `sockets` connections, `concurrency` at a time, and times each
 * stage of every one:
 *
 *   tcp        connect() -> TCP connected
 *   head       -> the HTTP 101 answer to the WebSocket upgrade
 *   open       -> the Engine.IO OPEN packet (then it sends the Socket.IO CONNECT with auth.token)
 *   sio        -> the Socket.IO CONNECT answer
 *   connected  -> the gateway's `connected` event
 *
 *   node bench/connect_timeline.js PORT SOCKETS CONCURRENCY JWT_SECRET [SERVER_PID]
 *
 * Works against Droid (bench/droid_server.py) and the Node references (bench/reference/server.js)
 * alike; prints one JSON object: totals, the server's CPU over the run when SERVER_PID is given,
 * this client's CPU, and p50/p90/p99/max of each stage in ms. Sockets belong to users two by two,
 * as in bench/run.py. Tokens are signed before the clock starts.
 */
"use strict";

const fs = require("fs");
const { RawSocket, now, sign } = require("./rawclient");

const [port, n, concurrency] = process.argv.slice(2, 5).map(Number);
const [secret, serverPid] = [process.argv[5], process.argv[6]];
if (!port || !n || !concurrency || !secret) {
  console.error("usage: node connect_timeline.js PORT SOCKETS CONCURRENCY JWT_SECRET [SERVER_PID]");
  process.exit(2);
}
const users = Math.max(1, Math.floor(n / 2));
const tokens = Array.from({ length: users }, (_, u) => sign(`timeline-user-${u}`, secret, "1h"));

function serverCpuMs() {
  if (!serverPid) return 0;
  const stat = fs.readFileSync(`/proc/${serverPid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) * 10; // clock ticks of 10 ms
}

const timings = [];
let reads = 0;

async function connectOne(i) {
  const socket = await new RawSocket(port, tokens[i % users]).connect();
  timings.push(socket.t);
  return socket;
}

(async () => {
  const open = [];
  let next = 0;
  const cpu0 = process.cpuUsage();
  const server0 = serverCpuMs();
  const t0 = now();
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, async () => {
    while (next < n) {
      const i = next++;
      open.push(await connectOne(i));
    }
  }));
  const wallMs = now() - t0;
  const cpu = process.cpuUsage(cpu0);
  for (const s of open) reads += s.reads;
  const serverMs = serverCpuMs() - server0;
  const q = (values, p) => values[Math.min(values.length - 1, Math.floor(p * values.length))];
  const stages = {
    tcp: (t) => t.tcp - t.start, head: (t) => t.head - t.tcp, open: (t) => t.open - t.head,
    sio: (t) => t.sio - t.open, connected: (t) => t.connected - t.sio,
    total: (t) => t.connected - t.start,
  };
  const out = {
    sockets: n, concurrency, connectS: +(wallMs / 1000).toFixed(3),
    connectsPerS: Math.round(n / (wallMs / 1000)),
    clientCpuPct: Math.round((cpu.user + cpu.system) / 10 / wallMs),
    readsPerSocket: +(reads / n).toFixed(2),
  };
  if (serverPid) {
    out.serverCpuPct = Math.round((100 * serverMs) / wallMs);
    out.serverCpuMsPerSocket = +(serverMs / n).toFixed(3);
  }
  for (const [name, f] of Object.entries(stages)) {
    const v = timings.map(f).sort((a, b) => a - b);
    out[name] = { p50: +q(v, 0.5).toFixed(2), p90: +q(v, 0.9).toFixed(2),
      p99: +q(v, 0.99).toFixed(2), max: +v[v.length - 1].toFixed(1) };
  }
  console.log(JSON.stringify(out));
  for (const s of open) s.destroy();
  process.exit(0);
})().catch((err) => {
  console.error(String(err));
  process.exit(1);
});
