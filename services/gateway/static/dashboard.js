// pagedserve dashboard: polls GET /v1/kv/map about twice a second and draws each pool's blocks,
// its requests and a few minutes of history. Plain browser JavaScript, no build step, no library.
// The map's wire format is described in services/gateway/kv_map.py.
import { CanvasCells, DOM_CELLS_UP_TO, DomCells, stateOf } from "./cells.js";
import { chart } from "./chart.js";

const POLL_MS = 500;
const HISTORY_MS = 5 * 60 * 1000;
const KEY_STORE = "pagedserve-api-key";

const views = new Map(); // pool id -> PoolView
let paused = false;
let apiKey = takeKey();

// --- the API key: from #key=..., else localStorage; asked for when the map answers 401 ----------

function takeKey() {
  const match = location.hash.match(/(?:^#|&)key=([^&]+)/);
  if (match) {
    localStorage.setItem(KEY_STORE, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return localStorage.getItem(KEY_STORE) || "";
}

function askKey() {
  const form = document.getElementById("keyform");
  if (!form.hidden) return;
  form.hidden = false;
  document.getElementById("key").focus();
}

document.getElementById("keyform").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = document.getElementById("key").value.trim();
  localStorage.setItem(KEY_STORE, apiKey);
  event.target.hidden = true;
});

document.getElementById("pause").addEventListener("click", (event) => {
  paused = !paused;
  event.target.textContent = paused ? "resume" : "pause";
});

function setStatus(text, isError) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

// --- polling -----------------------------------------------------------------------------------

async function poll() {
  let wait = POLL_MS;
  if (!paused) {
    try {
      const headers = apiKey ? { Authorization: "Bearer " + apiKey } : {};
      const resp = await fetch("/v1/kv/map", { headers, cache: "no-store" });
      const body = await resp.json();
      if (resp.status === 401) {
        askKey();
        setStatus("the map needs this gateway's API key", true);
      } else if (!resp.ok) {
        setStatus(body.error ? body.error.message : resp.statusText, true);
      } else {
        render(body);
        // A large pool costs a read of Redis and the gateway: spend at most 1/20 of the time on it.
        wait = Math.max(POLL_MS, 20 * (body.read_ms || 0));
        const t = new Date(body.time_ms).toLocaleTimeString();
        setStatus(`${body.pools.length} pool(s), updated ${t}`, false);
      }
    } catch (err) {
      setStatus("cannot read the map: " + err.message, true);
    }
  }
  setTimeout(poll, wait);
}

function render(body) {
  const seen = new Set();
  for (const pool of body.pools) {
    seen.add(pool.pool_id);
    let view = views.get(pool.pool_id);
    if (!view) {
      view = new PoolView(pool.pool_id);
      views.set(pool.pool_id, view);
    }
    view.update(pool, body.time_ms);
  }
  for (const [id, view] of views) {
    if (!seen.has(id)) {
      view.root.remove();
      views.delete(id);
    }
  }
}

// --- decoding the map ----------------------------------------------------------------------------

function expandRuns(runs, size) {
  // [code, count, ...] -> one code per block: ref_cnt > 0 used, 0 free, -1 cached, -2 swapped
  const codes = new Int32Array(size);
  let at = 0;
  for (let i = 0; i < runs.length; i += 2) {
    codes.fill(runs[i], at, Math.min(size, at + runs[i + 1]));
    at += runs[i + 1];
  }
  return codes;
}

function expandIds(runs) {
  // [first, delta, count, ...] -> block ids: after first, count ids each delta past the last
  if (!runs.length) return [];
  const ids = [runs[0]];
  for (let i = 1; i < runs.length; i += 2) {
    for (let k = 0; k < runs[i + 1]; k++) ids.push(ids[ids.length - 1] + runs[i]);
  }
  return ids;
}

// --- one pool ------------------------------------------------------------------------------------

class PoolView {
  constructor(poolId) {
    this.poolId = poolId;
    const tpl = document.getElementById("pool-template");
    this.root = tpl.content.firstElementChild.cloneNode(true);
    this.root.dataset.pool = poolId;
    document.getElementById("pools").appendChild(this.root);
    this.grid = this.root.querySelector(".grid");
    this.list = this.root.querySelector(".requests");
    this.cells = null; // DomCells or CanvasCells, made for the pool's size
    this.codes = new Int32Array(0);
    this.requests = new Map(); // request id -> {status, seqs, blocks: Set, computed}
    this.owners = new Map(); // block -> seq ids
    this.history = [];
    this.hovered = null;
    this.pinned = null;
    this.grid.addEventListener("mouseover", (event) => this.describeCell(event));
    this.grid.addEventListener("mousemove", (event) => this.describeCell(event));
    window.addEventListener("resize", () => {
      if (this.cells) this.cells.resize(this.codes);
    });
  }

  update(pool, timeMs) {
    this.root.querySelector(".pool-title").textContent =
      `pool ${pool.pool_id}` + (pool.model ? ` · ${pool.model}` : "");
    const counts = this.root.querySelector(".pool-counts");
    if (pool.error) {
      counts.className = "pool-counts pool-error";
      counts.textContent = pool.error;
      return;
    }
    counts.className = "pool-counts";
    this.drawCells(pool);
    this.readSequences(pool);
    this.drawCounts(counts, pool);
    this.drawRequests();
    this.light();
    this.record(pool, timeMs);
    this.drawCharts(timeMs);
  }

  drawCells(pool) {
    const n = pool.num_blocks;
    if (!this.cells || this.codes.length !== n) {
      this.grid.setAttribute("aria-label", `${n} KV blocks`);
      this.cells = n > DOM_CELLS_UP_TO ? new CanvasCells(this.grid, n) : new DomCells(this.grid, n);
      this.codes = new Int32Array(n);
    }
    const codes = expandRuns(pool.blocks, n);
    this.cells.update(codes, this.codes);
    this.codes = codes;
  }

  readSequences(pool) {
    this.requests = new Map();
    this.owners = new Map();
    for (const seq of pool.sequences) {
      const blocks = expandIds(seq.block_table);
      let req = this.requests.get(seq.request_id);
      if (!req) {
        req = { id: seq.request_id, status: "waiting", seqs: [], blocks: new Set(), computed: 0 };
        this.requests.set(seq.request_id, req);
      }
      req.seqs.push(seq);
      if (seq.status === "running") req.status = "running";
      req.computed = Math.max(req.computed, seq.num_computed_tokens);
      for (const b of blocks) {
        req.blocks.add(b);
        if (!this.owners.has(b)) this.owners.set(b, []);
        this.owners.get(b).push(seq.seq_id);
      }
    }
  }

  drawCounts(el, pool) {
    const c = pool.counts;
    const s = pool.stats;
    const parts = [
      `<b>${pool.num_blocks}</b> blocks of ${pool.block_size} tokens`,
      `<b>${c.used}</b> in use`,
      `<b>${c.cached}</b> cached`,
      `<b>${c.free}</b> free`,
      `<b>${c.swapped}</b> swapped`,
    ];
    if (s) {
      parts.push(`<b>${s.running}</b> running`, `<b>${s.waiting}</b> waiting`);
      if (s.prefix_hit_rate !== null) parts.push(`prefix hits <b>${(100 * s.prefix_hit_rate).toFixed(1)}%</b>`);
      parts.push(`<b>${s.preemptions_total}</b> preemptions`);
    }
    el.innerHTML = parts.join(" · "); // numbers only: nothing from a request reaches this HTML
  }

  drawRequests() {
    const items = new Map();
    for (const li of this.list.children) items.set(li.dataset.request, li);
    const ordered = [...this.requests.values()].sort(
      (a, b) => (a.status === b.status ? a.id.localeCompare(b.id) : a.status === "running" ? -1 : 1),
    );
    for (const req of ordered) {
      let li = items.get(req.id);
      if (!li) {
        li = document.createElement("li");
        li.dataset.request = req.id;
        li.addEventListener("mouseenter", () => { this.hovered = req.id; this.light(); });
        li.addEventListener("mouseleave", () => { this.hovered = null; this.light(); });
        li.addEventListener("click", () => {
          this.pinned = this.pinned === li.dataset.request ? null : li.dataset.request;
          this.light();
        });
      }
      items.delete(req.id);
      const choices = req.seqs.filter((s) => s.index >= 0).length;
      li.replaceChildren(
        span("rid", req.id),
        document.createTextNode(" "),
        span("st-" + req.status, req.status),
        span("meta", ` · ${choices || 1} seq · ${req.computed} tokens · ${req.blocks.size} blocks`),
      );
      li.classList.toggle("pinned", this.pinned === req.id);
      this.list.appendChild(li); // moves an existing item into order
    }
    for (const li of items.values()) li.remove();
    if (this.pinned && !this.requests.has(this.pinned)) this.pinned = null;
  }

  // Light up the hovered (else the pinned) request's blocks; ring those with ref_cnt > 1,
  // the blocks it shares with its other choices or with other requests.
  light() {
    const req = this.requests.get(this.hovered || this.pinned || "");
    for (const li of this.list.children) li.classList.toggle("pinned", li.dataset.request === this.pinned);
    if (this.cells) this.cells.light(req ? req.blocks : null, this.codes);
  }

  describeCell(event) {
    const b = this.cells ? this.cells.blockAt(event) : -1;
    if (b < 0 || b >= this.codes.length) return;
    const code = this.codes[b];
    const owners = this.owners.get(b) || [];
    let text = `block ${b}: ${stateOf(code)}`;
    if (code > 0) text += `, ref_cnt ${code}`;
    if (owners.length) text += `\nin the block tables of ${owners.join(", ")}`;
    event.target.title = text;
  }

  // --- history and plots -------------------------------------------------------------------------

  record(pool, timeMs) {
    const s = pool.stats || {};
    const prev = this.history[this.history.length - 1];
    const point = {
      t: timeMs,
      used: (100 * pool.counts.used) / Math.max(pool.num_blocks, 1),
      cached: (100 * pool.counts.cached) / Math.max(pool.num_blocks, 1),
      running: s.running || 0,
      waiting: s.waiting || 0,
      hits: s.prefix_cache_hit_tokens || 0,
      queries: s.prefix_cache_query_tokens || 0,
      preemptions: s.preemptions_total || 0,
      hitRate: null,
      preempted: 0,
    };
    if (prev) {
      const dq = point.queries - prev.queries;
      point.hitRate = dq > 0 ? (100 * (point.hits - prev.hits)) / dq : null;
      point.preempted = Math.max(0, point.preemptions - prev.preemptions);
    }
    this.history.push(point);
    while (this.history.length && this.history[0].t < timeMs - HISTORY_MS) this.history.shift();
  }

  drawCharts(now) {
    const h = this.history;
    const q = (cls) => this.root.querySelector(cls);
    chart(q(".chart-kv"), now, h, [["used", "#2a63c4"], ["cached", "#d99a1e"]], HISTORY_MS, 100);
    chart(q(".chart-hit"), now, h, [["hitRate", "#1b6e2e"]], HISTORY_MS, 100);
    chart(q(".chart-queue"), now, h, [["running", "#2a63c4"], ["waiting", "#b3261e"]], HISTORY_MS);
    chart(q(".chart-preempt"), now, h, [["preempted", "#b3261e"]], HISTORY_MS);
  }
}

function span(cls, text) {
  const el = document.createElement("span");
  el.className = cls;
  el.textContent = text;
  return el;
}

poll();
