// A remote control for the official Socket.IO client, driven by the pytest suite.
//
// Commands arrive on stdin, one JSON object a line; everything that happens is written to
// stdout, one JSON object a line, each with `t` (ms since start, from a monotonic clock):
//   {"cmd": "open", "id": "a", "url": "...", "opts": {...}}   a socket (new Manager each time)
//   {"cmd": "emit", "id": "a", "event": "ping", "args": [...], "ack": 7}   ack: a reference, or omit
//   {"cmd": "close", "id": "a"}
//   {"cmd": "post_and_time", "id": "a", "base": "http://…", "token": "…", "count": 50}
//                     POST /tasks `count` times, one after the other, and time how long each
//                     task takes to arrive on socket `a` as task.created
//   {"cmd": "exit"}
// Output lines: {"id", "type": "open" (the Engine.IO connection, with its first transport) |
// "upgrade" | "connect" | "connect_error" | "disconnect" | "event" | "ack" | "timings" |
// "error", ...}.
// Run it with `--require ./deadline.cjs`, which ends it after DEADLINE_MS whatever happens.
"use strict";

const { io } = require("socket.io-client");
const readline = require("readline");
const { performance } = require("perf_hooks");

const sockets = new Map();

function out(line) {
  process.stdout.write(JSON.stringify({ t: performance.now(), ...line }) + "\n");
}

function open({ id, url, opts }) {
  const socket = io(url, { reconnection: false, forceNew: true, timeout: 5000, ...opts });
  sockets.set(id, socket);
  socket.io.on("open", () => {
    const engine = socket.io.engine;
    out({ id, type: "open", transport: engine.transport.name });
    engine.on("upgrade", (transport) => out({ id, type: "upgrade", transport: transport.name }));
  });
  socket.on("connect", () => out({ id, type: "connect", sid: socket.id }));
  socket.on("connect_error", (err) => {
    out({ id, type: "connect_error", message: err.message, data: err.data === undefined ? null : err.data });
  });
  socket.on("disconnect", (reason) => out({ id, type: "disconnect", reason }));
  socket.onAny((name, ...args) => out({ id, type: "event", name, args }));
}

function emit({ id, event, args = [], ack }) {
  const socket = sockets.get(id);
  if (ack === undefined) {
    socket.emit(event, ...args);
    return;
  }
  socket.timeout(5000).emit(event, ...args, (err, ...reply) => {
    out({ id, type: "ack", ref: ack, error: err ? err.message : null, args: reply });
  });
}

async function postAndTime({ id, base, token, count }) {
  const socket = sockets.get(id);
  const timings = [];
  for (let i = 0; i < count; i++) {
    const prompt = `latency probe ${i} ${Math.random()}`;
    const arrived = new Promise((resolve) => {
      const listener = (envelope) => {
        if (envelope.data.prompt === prompt) {
          socket.off("task.created", listener);
          resolve(performance.now());
        }
      };
      socket.on("task.created", listener);
    });
    const start = performance.now();
    const reply = await fetch(`${base}/tasks`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify({ prompt }),
    });
    const replied = performance.now();
    if (reply.status !== 201) throw new Error(`POST /tasks answered ${reply.status}`);
    const eventAt = await arrived;
    timings.push({ event: eventAt - start, response: replied - start });
  }
  out({ id, type: "timings", timings });
}

const commands = { open, emit, close: ({ id }) => sockets.get(id).disconnect(), exit: () => process.exit(0) };

readline.createInterface({ input: process.stdin }).on("line", (text) => {
  let command;
  try {
    command = JSON.parse(text);
    if (command.cmd === "post_and_time") {
      postAndTime(command).catch((err) => out({ type: "error", message: String(err) }));
    } else {
      commands[command.cmd](command);
    }
  } catch (err) {
    out({ type: "error", message: String(err), command: text });
  }
}).on("close", () => process.exit(0));
