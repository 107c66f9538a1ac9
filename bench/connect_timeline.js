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

const crypto = require("crypto");
const fs = require("fs");
const net = require("net");
const path = require("path");
const jwt = require(path.join(__dirname, "reference", "node_modules", "jsonwebtoken"));

const [port, n, concurrency] = process.argv.slice(2, 5).map(Number);
const [secret, serverPid] = [process.argv[5], process.argv[6]];
if (!port || !n || !concurrency || !secret) {
  console.error("usage: node connect_timeline.js PORT SOCKETS CONCURRENCY JWT_SECRET [SERVER_PID]");
  process.exit(2);
}
const now = () => Number(process.hrtime.bigint()) / 1e6;
const users = Math.max(1, Math.floor(n / 2));
const tokens = Array.from({ length: users }, (_, u) =>
  jwt.sign({ sub: `timeline-user-${u}` }, secret, { algorithm: "HS256", expiresIn: "1h" }));

function serverCpuMs() {
  if (!serverPid) return 0;
  const stat = fs.readFileSync(`/proc/${serverPid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) * 10; // clock ticks of 10 ms
}

/** One client text frame (masked, as RFC 6455 requires of clients). */
function frame(text) {
  const payload = Buffer.from(text);
  const mask = crypto.randomBytes(4);
  let head;
  if (payload.length < 126) {
    head = Buffer.from([0x81, 0x80 | payload.length]);
  } else {
    head = Buffer.alloc(4);
    head[0] = 0x81;
    head[1] = 0x80 | 126;
    head.writeUInt16BE(payload.length, 2);
  }
  for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3];
  return Buffer.concat([head, mask, payload]);
}

const timings = [];
let reads = 0;

function connectOne(i) {
  return new Promise((resolve, reject) => {
    const t = { start: now() };
    const s = net.connect(port, "127.0.0.1");
    s.setNoDelay(true);
    let buf = Buffer.alloc(0);
    let upgraded = false;
    s.on("connect", () => {
      t.tcp = now();
      const key = crypto.randomBytes(16).toString("base64");
      s.write(`GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n` +
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" +
        `Sec-WebSocket-Key: ${key}\r\n\r\n`);
    });
    s.on("data", (d) => {
      reads += 1;
      buf = Buffer.concat([buf, d]);
      if (!upgraded) {
        const end = buf.indexOf("\r\n\r\n");
        if (end < 0) return;
        if (!buf.subarray(0, 12).toString().endsWith("101")) {
          reject(new Error(`no 101: ${buf.subarray(0, 40).toString()}`));
          return;
        }
        upgraded = true;
        t.head = now();
        buf = buf.subarray(end + 4);
      }
      while (buf.length >= 2) {
        let len = buf[1] & 0x7f;
        let off = 2;
        if (len === 126) {
          if (buf.length < 4) return;
          len = buf.readUInt16BE(2);
          off = 4;
        }
        if (buf.length < off + len) return;
        const text = buf.subarray(off, off + len).toString();
        buf = buf.subarray(off + len);
        if (text[0] === "0" && t.open === undefined) {
          t.open = now();
          s.write(frame(`40/events,${JSON.stringify({ token: tokens[i % users] })}`));
        } else if (text.startsWith("40/events")) {
          t.sio = now();
        } else if (text.startsWith("44/events")) {
          reject(new Error(`refused: ${text}`));
        } else if (text.startsWith('42/events,["connected"')) {
          t.connected = now();
          timings.push(t);
          resolve(s);
        }
      }
    });
    s.on("error", reject);
  });
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
