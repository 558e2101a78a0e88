// pagedserve dashboard: a pool's grid of blocks. Up to DOM_CELLS_UP_TO blocks, one element per
// block carrying its state in data attributes (what tests and tools read); past that, one canvas:
// a browser repaints every element of a 100,000-element grid for any change (seconds a poll).

const SHADES = 6; // data-level 1..6 of a used block, darker with more references

export function stateOf(code) {
  if (code > 0) return "used";
  return code === 0 ? "free" : code === -1 ? "cached" : "swapped";
}

export function levelOf(ref) {
  return ref >= 8 ? SHADES : Math.min(ref, SHADES - 1);
}

function cellSize(numBlocks) {
  if (numBlocks <= 1024) return 14;
  if (numBlocks <= 8192) return 8;
  if (numBlocks <= 32768) return 5;
  return 3;
}

export const DOM_CELLS_UP_TO = 16384;

function gridSize(grid, n) {
  // The grid is `contain: strict` (see the stylesheet): its height is set from the cells
  // per row that its width holds.
  const pitch = cellSize(n) + 1; // 1px gap
  const perRow = Math.max(1, Math.floor((grid.clientWidth + 1) / pitch));
  const rows = Math.ceil(n / perRow);
  grid.style.height = rows * pitch + "px";
  return { pitch, perRow, rows };
}

export class DomCells {
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

export class CanvasCells {
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
