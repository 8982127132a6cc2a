// Network: REST calls and the websocket connection (auto-reconnect with backoff).
// Messages are decoded here; callers get parsed JSON objects and decoded frames.

import { parseFrame } from "./decode.js";

const API = "/api/v1";

/** Error from a REST call; `message` is what the server said, `status` the HTTP status. */
export class ApiError extends Error {
  constructor(message, status, detail = null) {
    super(message);
    this.status = status;
    this.detail = detail; // what the server said, alone
  }
}

/** FastAPI error details are a string or a list of {loc, msg}: make one readable line. */
function describe(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => (d && d.msg ? `${(d.loc || []).join(".")}: ${d.msg}` : JSON.stringify(d))).join("; ");
  }
  return JSON.stringify(detail);
}

async function request(method, path, body = undefined, signal = undefined) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal,
  });
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    payload = null;
  }
  if (!response.ok) {
    const detail = payload && (payload.detail ?? payload.message);
    const text = describe(detail ?? response.statusText);
    throw new ApiError(`${method} ${API}${path} failed (${response.status}): ${text}`, response.status, text);
  }
  return payload;
}

export const api = {
  runs: () => request("GET", "/runs"),
  run: (id) => request("GET", `/runs/${encodeURIComponent(id)}`),
  control: (id, action) => request("POST", `/runs/${encodeURIComponent(id)}/${encodeURIComponent(action)}`),
  /** DELETE /api/v1/runs/{id}: an ended run and its data (recorded history, captures). */
  remove: (id) => request("DELETE", `/runs/${encodeURIComponent(id)}`),
  /** POST /api/v1/captures (docs/captures.md); resolves to the capture's metadata.
   * `signal` (an AbortSignal) cancels it: the server then keeps nothing. */
  capture: (body, signal = undefined) => request("POST", "/captures", body, signal),
  /** A run's captures, newest first (GET /api/v1/captures?run=). */
  captures: (run, limit = 20) => request("GET", `/captures?${new URLSearchParams({ run, limit: String(limit) })}`),
  removeCapture: (id) => request("DELETE", `/captures/${encodeURIComponent(id)}`),
  /** What input a capture of `run` takes: {text, tokens, features, vocab_size, message}. */
  captureInput: (run) => request("GET", `/captures/input?${new URLSearchParams({ run })}`),
  /** Every head's statistics, role scores and role on a capture's input (as `heads`). */
  captureHeads: (id) => request("GET", `/captures/${encodeURIComponent(id)}/heads`),
  /** One layer of a capture as a decoded frame ({header, data, shape}), as the stream's. */
  captureFrame: async (id, { layer, kind = "attention", heads = null, maxSide = 128 }) => {
    const params = new URLSearchParams({ layer: String(layer), kind, max_side: String(maxSide) });
    if (heads) params.set("heads", heads.join(","));
    const response = await fetch(`${API}/captures/${encodeURIComponent(id)}/frame?${params}`);
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = describe((await response.json()).detail); } catch { /* keep statusText */ }
      throw new ApiError(`layer ${layer} of capture ${id}: ${detail} (${response.status})`, response.status, detail);
    }
    return parseFrame(await response.arrayBuffer());
  },
  /** Pinned inputs (docs/captures.md): captured again every k steps while the run trains. */
  pins: (run) => request("GET", `/pins?${new URLSearchParams({ run })}`),
  pin: (body) => request("POST", "/pins", body),
  unpin: (id) => request("DELETE", `/pins/${encodeURIComponent(id)}`),
  /** GET /api/v1/runs/{id}/heads: statistics, role scores, roles, events (at `step`). */
  heads: (id, step = null) => request("GET", `/runs/${encodeURIComponent(id)}/heads${
    step === null ? "" : `?step=${encodeURIComponent(step)}`}`),
  /** Every head's recorded entropy over the run (at most `points` steps, spread evenly). */
  entropyCurves: (id, points = 200) => request("GET", `/runs/${encodeURIComponent(id)}/heads?${
    new URLSearchParams({ curve: "entropy", events: "0", points: String(points) })}`),
};

/** Websocket URL of the page's own server. */
export function socketUrl(location = window.location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

/**
 * One websocket that re-opens itself with exponential backoff (250 ms .. 5 s, jittered).
 * Handlers: onState(state, detail) with state "connecting" | "open" | "reconnecting";
 * onJson(message); onFrame({header, data, shape}); onDecodeError(error).
 */
export class Connection {
  constructor(url, handlers) {
    this.url = url;
    this.handlers = handlers;
    this.attempt = 0;
    this.socket = null;
    this.timer = null;
    this.closed = false;
  }

  open() {
    this.closed = false;
    clearTimeout(this.timer);
    this.handlers.onState("connecting");
    const socket = new WebSocket(this.url);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      this.attempt = 0;
      this.handlers.onState("open");
    };
    socket.onmessage = (event) => this.receive(event.data);
    socket.onclose = () => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (!this.closed) this.scheduleReconnect();
    };
    this.socket = socket;
  }

  scheduleReconnect() {
    const base = Math.min(5000, 250 * 2 ** this.attempt);
    const delay = Math.round(base * (0.75 + 0.5 * Math.random()));
    this.attempt += 1;
    this.handlers.onState("reconnecting", delay);
    this.timer = setTimeout(() => this.open(), delay);
  }

  /** Feed one websocket message (string or ArrayBuffer) through decoding and the handlers. */
  receive(data) {
    if (typeof data === "string") {
      let message;
      try {
        message = JSON.parse(data);
      } catch (err) {
        this.handlers.onDecodeError(err);
        return;
      }
      this.handlers.onJson(message);
      return;
    }
    let frame;
    try {
      frame = parseFrame(data);
    } catch (err) {
      this.handlers.onDecodeError(err);
      return;
    }
    this.handlers.onFrame(frame);
  }

  get isOpen() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  /** Send a JSON message; returns false (and sends nothing) while disconnected. */
  send(message) {
    if (!this.isOpen) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000);
    this.socket = null;
  }
}
