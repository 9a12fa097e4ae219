// Traffic figures from two readings of GET /api/v1/traffic (cumulative counters), and a
// hand-drawn SVG sparkline. No chart library: a polyline is all a trend needs.

const SVG = 'http://www.w3.org/2000/svg';
const KEEP = 60; // readings kept per app (two minutes at one per 2 s)

export class Traffic {
  constructor() { this.readings = []; this.series = new Map(); }

  // Add a reading; returns per app {rate, errors, p50, p99} over the last interval
  // (null where there is no earlier reading or a proxy restarted since).
  add(doc) {
    const previous = this.readings[this.readings.length - 1];
    this.readings.push(doc);
    if (this.readings.length > 2) this.readings.shift();
    const out = new Map();
    for (const [app, now] of Object.entries(doc.apps || {})) {
      const before = previous && previous.apps ? previous.apps[app] : undefined;
      let figures = null;
      const dt = previous ? doc.at - previous.at : 0;
      if (before && dt > 0 && now.requests >= before.requests) {
        const n = now.requests - before.requests;
        const buckets = (doc.le || []).length + 1;
        const delta = now.latency.slice(0, buckets).map((v, i) => v - (before.latency[i] || 0));
        figures = { rate: n / dt, errors: n ? (now.errors - before.errors) / n : 0,
                    p50: quantile(delta, doc.le || [], 0.5), p99: quantile(delta, doc.le || [], 0.99) };
      }
      out.set(app, figures);
      const series = this.series.get(app) || [];
      series.push(figures ? figures.rate : 0);
      if (series.length > KEEP) series.shift();
      this.series.set(app, series);
    }
    return out;
  }
}

// The upper bound (seconds) of the bucket holding the q-th quantile; Infinity past the last.
export function quantile(counts, le, q) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (total <= 0) return null;
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    seen += counts[i];
    if (seen >= q * total) return i < le.length ? le[i] : Infinity;
  }
  return Infinity;
}

export function ms(seconds) {
  if (seconds === null || seconds === undefined) return '–';
  if (seconds === Infinity) return `> ${10} s`;
  return seconds < 1 ? `≤ ${+(seconds * 1000).toFixed(1)} ms` : `≤ ${seconds} s`;
}

export function sparkline(values, label) {
  const width = 80, height = 20;
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('width', width);
  svg.setAttribute('height', height);
  svg.setAttribute('class', 'spark');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', label);
  const title = document.createElementNS(SVG, 'title');
  title.textContent = label;
  svg.append(title);
  const max = Math.max(1e-9, ...values);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 1 - (v / max) * (height - 2)).toFixed(1)}`);
  const line = document.createElementNS(SVG, 'polyline');
  line.setAttribute('points', points.join(' '));
  line.setAttribute('fill', 'none');
  line.setAttribute('stroke', 'currentColor');
  line.setAttribute('stroke-width', '1.5');
  svg.append(line);
  return svg;
}
