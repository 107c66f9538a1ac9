/**
 * A minimal /events client for the bench: a few lines of WebSocket framing on a TCP socket, no
 * socket.io-client, so that a connection costs the client little CPU (~0.4 ms) and the server
 * under test sets the pace. Used by connect_timeline.js (stage timings of many connects) and
 * scale_client.js (thousands of idle sockets, churn, a latency probe).
 *
 * A RawSocket does what an idle browser tab's socket.io-client does on the wire: the WebSocket
 * upgrade of /socket.io/?EIO=4&transport=websocket, the Socket.IO CONNECT of /events with
 * auth.token, an answer to each Engine.IO ping, an answer to the server's WebSocket close frame
 * (so that neither server waits for a close timeout at shutdown), and on close() the Socket.IO
 * DISCONNECT then a WebSocket close frame. It records when each stage of its connection ended:
 *
 *   t.start      connect() called
 *   t.tcp        TCP connected
 *   t.head       the HTTP 101 answer to the upgrade
 *   t.open       the Engine.IO OPEN packet (the Socket.IO CONNECT is sent then)
 *   t.sio        the Socket.IO CONNECT answer
 *   t.connected  the gateway's `connected` event
 *
 * Every other Socket.IO message of /events is handed to `onMessage(text)` (e.g.
 * `42/events,["task.processing",{...}]`), untouched: decoding is the caller's choice.
 */
"use strict";

const crypto = require("crypto");
const net = require("net");
const path = require("path");
const jwt = require(path.join(__dirname, "reference", "node_modules", "jsonwebtoken"));

/** Milliseconds on CLOCK_MONOTONIC (the clock the servers stamp data.sentAt with). */
const now = () => Number(process.hrtime.bigint()) / 1e6;

/** An HS256 token for `userId`, as the servers accept it. */
function sign(userId, secret, expiresIn = "1d") {
  return jwt.sign({ sub: userId }, secret, { algorithm: "HS256", expiresIn });
}

/** One client frame (masked, as RFC 6455 requires of clients); opcode 1 text, 8 close, 10 pong. */
function frame(data, opcode = 0x1) {
  const payload = Buffer.from(data);
  const mask = crypto.randomBytes(4);
  let head;
  if (payload.length < 126) {
    head = Buffer.from([0x80 | opcode, 0x80 | payload.length]);
  } else if (payload.length < 65536) {
    head = Buffer.alloc(4);
    head[0] = 0x80 | opcode;
    head[1] = 0x80 | 126;
    head.writeUInt16BE(payload.length, 2);
  } else {
    head = Buffer.alloc(10);
    head[0] = 0x80 | opcode;
    head[1] = 0x80 | 127;
    head.writeBigUInt64BE(BigInt(payload.length), 2);
  }
  for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3];
  return Buffer.concat([head, mask, payload]);
}

const CLOSE_NORMAL = Buffer.from([0x03, 0xe8]); // 1000
const CLOSE_WAIT_MS = 5000; // after our close frame, how long the server gets to answer it

class RawSocket {
  /**
   * @param {number} port  the server's port on 127.0.0.1
   * @param {string} token the user's JWT
   * @param {{onMessage?: (text: string) => void, onClose?: () => void, timeoutMs?: number}} options
   */
  constructor(port, token, { onMessage = null, onClose = null, timeoutMs = 60000 } = {}) {
    this.port = port;
    this.token = token;
    this.onMessage = onMessage;
    this.onClose = onClose;
    this.timeoutMs = timeoutMs;
    this.t = {};
    this.reads = 0;
    this.connected = false;
    this.closed = false;
    this.closing = false; // our close frame was sent
    this.sock = null;
    this.buf = null;
  }

  /** Resolves with this socket once `connected` arrived; rejects on refusal, error or timeout. */
  connect() {
    return new Promise((resolve, reject) => {
      this.t.start = now();
      const s = (this.sock = net.connect(this.port, "127.0.0.1"));
      s.setNoDelay(true);
      let upgraded = false;
      let settled = false;
      const fail = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        s.destroy();
        reject(err);
      };
      const timer = setTimeout(() => fail(new Error(`no \`connected\` within ${this.timeoutMs} ms`)),
        this.timeoutMs);
      this._ready = () => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.connected = true;
        resolve(this);
      };
      this._refused = (text) => fail(new Error(`refused: ${text}`));
      s.on("connect", () => {
        this.t.tcp = now();
        const key = crypto.randomBytes(16).toString("base64");
        s.write(`GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1:${this.port}\r\n` +
          "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" +
          `Sec-WebSocket-Key: ${key}\r\n\r\n`);
      });
      s.on("data", (d) => {
        this.reads += 1;
        this.buf = this.buf ? Buffer.concat([this.buf, d]) : d;
        if (!upgraded) {
          const end = this.buf.indexOf("\r\n\r\n");
          if (end < 0) return;
          if (!this.buf.subarray(0, 12).toString().endsWith("101")) {
            fail(new Error(`no 101: ${this.buf.subarray(0, 40).toString()}`));
            return;
          }
          upgraded = true;
          this.t.head = now();
          this.buf = this.buf.subarray(end + 4);
        }
        this._frames();
      });
      s.on("error", (err) => fail(err));
      s.on("close", () => {
        this.closed = true;
        clearTimeout(this._closeTimer);
        fail(new Error("closed before `connected`"));
        if (this.connected && this.onClose) this.onClose();
      });
    });
  }

  /** Parse every complete server frame in this.buf (servers send them unmasked, unfragmented). */
  _frames() {
    let buf = this.buf;
    while (buf.length >= 2) {
      const opcode = buf[0] & 0x0f;
      let len = buf[1] & 0x7f;
      let off = 2;
      if (len === 126) {
        if (buf.length < 4) break;
        len = buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (buf.length < 10) break;
        len = Number(buf.readBigUInt64BE(2));
        off = 10;
      }
      if (buf.length < off + len) break;
      const payload = buf.subarray(off, off + len);
      buf = buf.subarray(off + len);
      if (opcode === 0x1) this._text(payload.toString());
      else if (opcode === 0x8) this._serverClose(payload);
      else if (opcode === 0x9) this._write(frame(payload, 0xa)); // WebSocket ping -> pong
    }
    this.buf = buf.length ? buf : null;
  }

  _text(text) {
    const c = text[0];
    if (c === "2") {
      this._write(frame("3")); // Engine.IO ping -> pong
    } else if (c === "4") {
      if (this.connected) {
        if (this.onMessage) this.onMessage(text);
      } else if (text.startsWith('42/events,["connected"')) {
        this.t.connected = now();
        this._ready();
      } else if (text.startsWith("40/events")) {
        this.t.sio = now();
      } else if (text.startsWith("44/events")) {
        this._refused(text);
      }
    } else if (c === "0" && this.t.open === undefined) {
      this.t.open = now();
      this._write(frame(`40/events,${JSON.stringify({ token: this.token })}`));
    }
  }

  /** The server's close frame: answer it (unless ours crossed it), then close the TCP socket. */
  _serverClose(payload) {
    if (!this.closing) {
      this.closing = true;
      this._write(frame(payload.subarray(0, 2), 0x8));
    }
    this.sock.end();
  }

  _write(data) {
    if (!this.sock.destroyed && this.sock.writable) this.sock.write(data);
  }

  /** What a page does when it goes away: Socket.IO DISCONNECT, then a WebSocket close frame;
   * the TCP socket closes when the server answers (or CLOSE_WAIT_MS later). */
  close() {
    if (this.closing || this.closed) return;
    this.closing = true;
    this._write(frame("41/events,"));
    this._write(frame(CLOSE_NORMAL, 0x8));
    this._closeTimer = setTimeout(() => this.sock.destroy(), CLOSE_WAIT_MS);
  }

  /** Drop the TCP connection without a word. */
  destroy() {
    this.closing = true;
    if (this.sock) this.sock.destroy();
  }
}

module.exports = { RawSocket, frame, now, sign };
