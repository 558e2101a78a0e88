// pagedserve dashboard: small line plots on a canvas, hand-drawn (no library).

// A line per series over the last historyMs; a null value breaks its line. `fixedMax`: the
// y range (percentages), else the largest value shown.
export function chart(canvas, now, points, series, historyMs, fixedMax) {
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
  // The x axis spans what has been seen, up to historyMs: a fresh page fills its plots at once.
  const start = points.length ? Math.max(points[0].t, now - historyMs) : now - historyMs;
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
