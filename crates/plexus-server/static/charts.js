// The canvas charts of the quotes page (/quotes) and the admin page (/admin): sizing for HiDPI
// screens, the empty state, grid lines with labels, time labels, the line with a soft fill under
// it, dots. Served at /charts.js; an ES module without dependencies. The pages keep what differs
// (scales, which labels, the last-price tag, gaps in the series): these functions draw the parts.
//
// Colours come from the page's CSS variables (--muted, --grid and the line colours), so the
// charts follow its light and dark themes.

/** A CSS custom property of the document, e.g. `cssVar('--muted')`. */
export function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/** `#rrggbb` (or `#rgb`) with an alpha, for canvas gradients. */
export function withAlpha(hex, alpha) {
  let h = hex.replace('#', '');
  if (h.length === 3) h = [...h].map((c) => c + c).join('');
  const n = Number.parseInt(h, 16);
  if (h.length !== 6 || Number.isNaN(n)) return `rgba(128, 128, 128, ${alpha})`;
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

/**
 * Sizes the canvas's pixels to its CSS size times the device pixel ratio, clears it and sets an
 * 11px font in the page's font: `{ctx, width, height, font, muted}` in CSS pixels, or null while
 * the canvas is not laid out (zero width or height).
 */
export function beginChart(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width === 0 || height === 0) return null;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const font = getComputedStyle(document.body).fontFamily;
  const muted = cssVar('--muted');
  ctx.font = `11px ${font}`;
  return { ctx, width, height, font, muted };
}

/** A muted line of text in the middle of a chart without data. */
export function drawEmpty({ ctx, width, height, muted }, text) {
  ctx.fillStyle = muted;
  ctx.textAlign = 'center';
  ctx.textBaseline = 'middle';
  ctx.fillText(text, width / 2, height / 2);
}

/**
 * Horizontal grid lines across `plot` at each of `values` (`y(value)` is its height), each with
 * `label(value, yy)` written at `labelX` with `align`; no text where `label` gives null.
 */
export function drawGrid({ ctx, muted }, plot, values, y, { label, labelX, align }) {
  ctx.strokeStyle = cssVar('--grid');
  ctx.lineWidth = 1;
  ctx.fillStyle = muted;
  ctx.textAlign = align;
  ctx.textBaseline = 'middle';
  for (const value of values) {
    const yy = Math.round(y(value)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(plot.left, yy);
    ctx.lineTo(plot.right, yy);
    ctx.stroke();
    const text = label(value, yy);
    if (text !== null) ctx.fillText(text, labelX, yy);
  }
}

/** The times of the oldest (when there are two or more) and the newest of `points` (`{t}`), under the plot. */
export function drawTimeLabels({ ctx, height, muted }, plot, points, timeFormat) {
  ctx.fillStyle = muted;
  ctx.textBaseline = 'alphabetic';
  ctx.textAlign = 'left';
  if (points.length > 1) ctx.fillText(timeFormat.format(new Date(points[0].t)), plot.left, height - 4);
  ctx.textAlign = 'right';
  ctx.fillText(timeFormat.format(new Date(points[points.length - 1].t)), plot.right, height - 4);
}

/** A vertical gradient over `plot` from `color` at alpha `from` (top) to alpha `to` (bottom). */
export function areaGradient({ ctx }, plot, color, from, to) {
  const gradient = ctx.createLinearGradient(0, plot.top, 0, plot.bottom);
  gradient.addColorStop(0, withAlpha(color, from));
  gradient.addColorStop(1, withAlpha(color, to));
  return gradient;
}

/** A 2px line through `xy` (`[x, y]` pairs) in `color`, the area under it down to `bottom` filled with `fill`. */
export function drawArea({ ctx }, xy, bottom, fill, color) {
  const trace = () => xy.forEach(([px, py], i) => (i === 0 ? ctx.moveTo(px, py) : ctx.lineTo(px, py)));
  ctx.beginPath();
  trace();
  ctx.lineTo(xy[xy.length - 1][0], bottom);
  ctx.lineTo(xy[0][0], bottom);
  ctx.closePath();
  ctx.fillStyle = fill;
  ctx.fill();
  ctx.beginPath();
  trace();
  ctx.strokeStyle = color;
  ctx.lineWidth = 2;
  ctx.lineJoin = 'round';
  ctx.stroke();
}

/** A filled dot of radius `r`; leaves `color` as the fill style. */
export function drawDot({ ctx }, x, y, r, color) {
  ctx.fillStyle = color;
  ctx.beginPath();
  ctx.arc(x, y, r, 0, Math.PI * 2);
  ctx.fill();
}
