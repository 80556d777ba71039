/** A small line plot on a canvas: milliseconds of each decode step, one line per run. */
const COLORS = ['#888', '#c0392b', '#2471a3', '#1e8449'];

export function drawPlot(canvas: HTMLCanvasElement, series: { label: string; values: number[] }[]): void {
  const g = canvas.getContext('2d');
  if (!g) return;
  const { width: w, height: h } = canvas;
  const pad = { l: 44, r: 10, t: 18, b: 22 };
  g.clearRect(0, 0, w, h);
  g.font = '11px system-ui, sans-serif';
  const n = Math.max(2, ...series.map((s) => s.values.length));
  const max = Math.max(1e-3, ...series.flatMap((s) => s.values)) * 1.1;
  const x = (i: number) => pad.l + (i / (n - 1)) * (w - pad.l - pad.r);
  const y = (v: number) => h - pad.b - (v / max) * (h - pad.t - pad.b);
  g.strokeStyle = '#ccc';
  g.fillStyle = '#555';
  g.beginPath();
  g.moveTo(pad.l, pad.t);
  g.lineTo(pad.l, h - pad.b);
  g.lineTo(w - pad.r, h - pad.b);
  g.stroke();
  g.fillText(`${max.toFixed(1)} ms`, 2, pad.t + 4);
  g.fillText('0', pad.l - 12, h - pad.b);
  g.fillText('decode step →', w / 2 - 30, h - 6);
  series.forEach((s, k) => {
    g.strokeStyle = COLORS[k % COLORS.length];
    g.fillStyle = COLORS[k % COLORS.length];
    g.beginPath();
    s.values.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
    g.stroke();
    g.fillText(s.label, pad.l + 8 + k * 110, pad.t - 6);
  });
}
