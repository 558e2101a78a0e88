// pagedserve dashboard: polls GET /v1/kv/map about twice a second and draws each pool's blocks,
// its requests and a few minutes of history. Plain browser JavaScript, no build step, no library.
// The map's wire format is described in services/gateway/kv_map.py.
"use strict";

(() => {
  const POLL_MS = 500;
  const HISTORY_MS = 5 * 60 * 1000;
  const KEY_STORE = "pagedserve-api-key";
  const SHADES = 6; // data-level 1..6 of a used block, darker with more references

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

  function stateOf(code) {
    if (code > 0) return "used";
    return code === 0 ? "free" : code === -1 ? "cached" : "swapped";
  }

  function levelOf(ref) {
    return ref >= 8 ? SHADES : Math.min(ref, SHADES - 1);
  }

  function cellSize(numBlocks) {
    if (numBlocks <= 1024) return 14;
    if (numBlocks <= 8192) return 8;
    if (numBlocks <= 32768) return 5;
    return 3;
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
      chart(q(".chart-kv"), now, h, [["used", "#2a63c4"], ["cached", "#d99a1e"]], 100);
      chart(q(".chart-hit"), now, h, [["hitRate", "#1b6e2e"]], 100);
      chart(q(".chart-queue"), now, h, [["running", "#2a63c4"], ["waiting", "#b3261e"]]);
      chart(q(".chart-preempt"), now, h, [["preempted", "#b3261e"]]);
    }
  }

  // --- the cells of a pool: one element each up to DOM_CELLS_UP_TO blocks, else one canvas ----------

  // Elements carry their state in data attributes (what tests and tools read); past a few
  // thousand, every change would make the browser repaint them all, so a canvas draws them.
  const DOM_CELLS_UP_TO = 16384;

  function gridSize(grid, n) {
    // The grid is `contain: strict` (see the stylesheet): its height is set from the cells
    // per row that its width holds.
    const pitch = cellSize(n) + 1; // 1px gap
    const perRow = Math.max(1, Math.floor((grid.clientWidth + 1) / pitch));
    const rows = Math.ceil(n / perRow);
    grid.style.height = rows * pitch + "px";
    return { pitch, perRow, rows };
  }

  class DomCells {
    constructor(grid, n) {
      this.grid = grid;
      this.lit = [];
      grid.classList.remove("canvas-grid");
      grid.replaceChildren();
      grid.style.setProperty("--cell", cellSize(n) + "px");
      this.n = n;
      gridSize(grid, n);
      const frag = document.createDocumentFragment();
      this.cells = new Array(n);
      for (let b = 0; b < n; b++) {
        const cell = document.createElement("span");
        cell.className = "cell";
        cell.dataset.block = b;
        cell.dataset.state = "free";
        cell.dataset.ref = "0";
        this.cells[b] = cell;
        frag.appendChild(cell);
      }
      grid.appendChild(frag);
    }

    resize() {
      gridSize(this.grid, this.n);
    }

    update(codes, previous) {
      for (let b = 0; b < this.n; b++) {
        if (codes[b] === previous[b]) continue;
        const cell = this.cells[b];
        cell.dataset.state = stateOf(codes[b]);
        cell.dataset.ref = String(Math.max(codes[b], 0));
        if (codes[b] > 0) cell.dataset.level = String(levelOf(codes[b]));
        else delete cell.dataset.level;
      }
    }

    light(blocks, codes) {
      for (const cell of this.lit) cell.classList.remove("hl", "shared");
      this.lit = [];
      this.grid.classList.toggle("focus", Boolean(blocks));
      if (!blocks) return;
      for (const b of blocks) {
        const cell = this.cells[b];
        if (!cell) continue;
        cell.classList.add("hl");
        if (codes[b] > 1) cell.classList.add("shared");
        this.lit.push(cell);
      }
    }

    blockAt(event) {
      const cell = event.target;
      return cell.classList && cell.classList.contains("cell") ? Number(cell.dataset.block) : -1;
    }
  }

  class CanvasCells {
    constructor(grid, n) {
      this.grid = grid;
      this.n = n;
      this.canvas = document.createElement("canvas");
      this.canvas.className = "grid-canvas";
      grid.classList.add("canvas-grid");
      grid.replaceChildren(this.canvas);
      const css = getComputedStyle(document.documentElement);
      const color = (name) => css.getPropertyValue(name).trim();
      this.colors = {
        free: color("--free"),
        cached: color("--cached"),
        swapped: color("--swapped"),
        used: [1, 2, 3, 4, 5, 6].map((level) => color(`--used-${level}`)),
      };
      this.faded = new Map(); // colour -> its faded form, for cells outside the lit request
      this.codes = new Int32Array(n);
      this.lit = null;
      this.resize(this.codes);
    }

    resize(codes) {
      this.layout = gridSize(this.grid, this.n);
      this.canvas.width = this.layout.perRow * this.layout.pitch;
      this.canvas.height = this.layout.rows * this.layout.pitch;
      this.draw(codes);
    }

    update(codes) {
      this.draw(codes);
    }

    light(blocks, codes) {
      this.lit = blocks;
      this.draw(codes);
    }

    colorOf(code) {
      if (code > 0) return this.colors.used[levelOf(code) - 1];
      return code === 0 ? this.colors.free : code === -1 ? this.colors.cached : this.colors.swapped;
    }

    fade(color) {
      if (!this.faded.has(color)) {
        const rgb = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
        const mixed = rgb.map((v) => Math.round(0.18 * v + 0.82 * 248));
        this.faded.set(color, `rgb(${mixed.join(",")})`);
      }
      return this.faded.get(color);
    }

    draw(codes) {
      this.codes = codes;
      const ctx = this.canvas.getContext("2d");
      const { pitch, perRow } = this.layout;
      const size = pitch - 1;
      ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
      let style = "";
      for (let b = 0; b < this.n; b++) {
        let color = this.colorOf(codes[b]);
        if (this.lit && !this.lit.has(b)) color = this.fade(color);
        if (color !== style) ctx.fillStyle = style = color;
        ctx.fillRect((b % perRow) * pitch, Math.floor(b / perRow) * pitch, size, size);
      }
      if (!this.lit) return;
      ctx.fillStyle = "#e8453c";
      for (const b of this.lit) {
        if (codes[b] > 1) ctx.fillRect((b % perRow) * pitch, Math.floor(b / perRow) * pitch, size, 1);
      }
    }

    blockAt(event) {
      const { pitch, perRow } = this.layout;
      const rect = this.canvas.getBoundingClientRect();
      const col = Math.floor((event.clientX - rect.left) / pitch);
      const row = Math.floor((event.clientY - rect.top) / pitch);
      return col < perRow ? row * perRow + col : -1;
    }
  }

  function span(cls, text) {
    const el = document.createElement("span");
    el.className = cls;
    el.textContent = text;
    return el;
  }

  // A line per series over the last HISTORY_MS; a null value breaks its line. `fixedMax`: the
  // y range (percentages), else the largest value shown.
  function chart(canvas, now, points, series, fixedMax) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width;
    const h = canvas.height;
    const pad = 4;
    const top = 16; // room for the label
    ctx.clearRect(0, 0, w, h);
    let max = fixedMax || 1;
    if (!fixedMax) {
      for (const p of points) for (const [key] of series) if (p[key] !== null) max = Math.max(max, p[key]);
    }
    // The x axis spans what has been seen, up to HISTORY_MS: a fresh page fills its plots at once.
    const start = points.length ? Math.max(points[0].t, now - HISTORY_MS) : now - HISTORY_MS;
    const span = Math.max(now - start, 10_000);
    const x = (t) => ((t - start) / span) * w;
    const y = (v) => h - pad - (v / max) * (h - pad - top);
    ctx.strokeStyle = "#eceff2";
    ctx.beginPath();
    ctx.moveTo(0, y(max / 2));
    ctx.lineTo(w, y(max / 2));
    ctx.stroke();
    for (const [key, color] of series) {
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let drawing = false;
      for (const p of points) {
        if (p[key] === null) {
          drawing = false;
          continue;
        }
        if (drawing) ctx.lineTo(x(p.t), y(p[key]));
        else ctx.moveTo(x(p.t), y(p[key]));
        drawing = true;
      }
      ctx.stroke();
    }
    ctx.fillStyle = "#5b6570";
    ctx.font = "10px system-ui, sans-serif";
    const last = points[points.length - 1];
    const now_ = last ? series.map(([key]) => (last[key] === null ? "–" : round(last[key]))).join(" / ") : "";
    ctx.fillText(`max ${round(max)}   now ${now_}   last ${Math.round(span / 1000)} s`, 4, 11);
  }

  function round(v) {
    return Number.isInteger(v) ? String(v) : v.toFixed(1);
  }

  poll();
})();
