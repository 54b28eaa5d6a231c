// The live stream of one run: one websocket, resumed from the last seq it saw.
//
// Frames carry a per-run seq with no gaps. The stream remembers the last one
// handed to the page; after a dropped connection (network, server restart, or
// the server closing a slow client with 4008) it reconnects with ?since=<that
// seq>, so the page gets exactly the frames it missed and never one twice.

const ENDED = 1000; // the server closes normally once the run has ended and every frame was sent
const UNKNOWN_RUN = 4404;

export class RunStream {
  /**
   * @param {string} runId
   * @param {(frame: object) => void} onFrame
   * @param {(state: "live" | "reconnecting" | "ended" | "gone") => void} [onState]
   */
  constructor(runId, onFrame, onState = () => {}) {
    this.runId = runId;
    this.onFrame = onFrame;
    this.onState = onState;
    this.lastSeq = 0;
    this.retries = 0;
    this.stopped = false;
    this.socket = null;
  }

  open(since) {
    this.lastSeq = since;
    this.connect();
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/ws/runs/${encodeURIComponent(this.runId)}?since=${this.lastSeq}`;
    const socket = new WebSocket(url);
    this.socket = socket;
    socket.onopen = () => {
      this.retries = 0;
      this.onState("live");
    };
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (typeof frame.seq !== "number" || frame.seq <= this.lastSeq) return;
      this.lastSeq = frame.seq;
      this.onFrame(frame);
    };
    socket.onclose = (event) => {
      if (this.stopped) return;
      if (event.code === ENDED) return this.onState("ended");
      if (event.code === UNKNOWN_RUN) return this.onState("gone");
      this.onState("reconnecting");
      const delay = Math.min(5000, 250 * 2 ** this.retries++);
      setTimeout(() => this.stopped || this.connect(), delay);
    };
  }

  close() {
    this.stopped = true;
    this.socket?.close();
  }
}

/** Shows the state of the page's streams in the top bar. */
export function connectionIndicator() {
  const el = document.getElementById("conn");
  const states = new Map();
  return (key, state) => {
    states.set(key, state);
    const values = [...states.values()];
    if (!el) return;
    el.hidden = false;
    el.classList.toggle("down", values.includes("reconnecting"));
    el.textContent = values.includes("reconnecting") ? "● reconnecting…"
      : values.includes("live") ? "● live" : "● ended";
  };
}
