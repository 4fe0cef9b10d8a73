/**
 * A small hand-written SVG line chart: panels side by side, each with axes, ticks, a polyline per
 * series and a legend. Enough to show convergence at a glance; no dependency.
 */

export interface ChartSeries {
  name: string
  color: string
  /** [x, y] in the panel's units, x ascending. */
  points: [number, number][]
  /** Dashed, for a reference line such as the ideal. */
  dashed?: boolean
}

export interface ChartPanel {
  title: string
  xLabel: string
  yLabel: string
  series: ChartSeries[]
}

const W = 600 // one panel
const H = 360
const M = { left: 64, right: 16, top: 40, bottom: 48 }

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;')

/** About `count` round tick values (1, 2 or 5 times a power of ten) from 0 to at least `max`. */
export function ticks(max: number, count = 5): number[] {
  if (!(max > 0)) return [0, 1]
  const raw = max / count
  const p = 10 ** Math.floor(Math.log10(raw))
  const step = [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw)!
  const out: number[] = []
  for (let v = 0; v < max + step * 0.999; v += step) out.push(Number(v.toPrecision(12)))
  return out
}

const label = (v: number) => (Math.abs(v) >= 1000 ? v.toFixed(0) : String(Number(v.toPrecision(3))))

function panel(p: ChartPanel, dx: number): string {
  const pts = p.series.flatMap((s) => s.points)
  const xt = ticks(Math.max(1e-9, ...pts.map(([x]) => x)))
  const yt = ticks(Math.max(1e-9, ...pts.map(([, y]) => y)))
  const xMax = xt[xt.length - 1]!, yMax = yt[yt.length - 1]!
  const yMin = Math.min(0, ...pts.map(([, y]) => y))
  const iw = W - M.left - M.right, ih = H - M.top - M.bottom
  const X = (x: number) => dx + M.left + (x / xMax) * iw
  const Y = (y: number) => M.top + ih - ((y - yMin) / (yMax - yMin)) * ih
  const out: string[] = []
  out.push(`<text x="${dx + W / 2}" y="22" text-anchor="middle" font-weight="bold">${esc(p.title)}</text>`)
  for (const v of yt) out.push(`<line x1="${X(0)}" x2="${X(xMax)}" y1="${Y(v)}" y2="${Y(v)}" stroke="#ddd"/><text x="${X(0) - 6}" y="${Y(v) + 4}" text-anchor="end">${label(v)}</text>`)
  for (const v of xt) out.push(`<line x1="${X(v)}" x2="${X(v)}" y1="${Y(yMin)}" y2="${Y(yMin) + 5}" stroke="#333"/><text x="${X(v)}" y="${Y(yMin) + 18}" text-anchor="middle">${label(v)}</text>`)
  out.push(`<line x1="${X(0)}" x2="${X(xMax)}" y1="${Y(yMin)}" y2="${Y(yMin)}" stroke="#333"/><line x1="${X(0)}" x2="${X(0)}" y1="${Y(yMin)}" y2="${Y(yMax)}" stroke="#333"/>`)
  out.push(`<text x="${dx + M.left + iw / 2}" y="${H - 8}" text-anchor="middle">${esc(p.xLabel)}</text>`)
  out.push(`<text transform="translate(${dx + 16} ${M.top + ih / 2}) rotate(-90)" text-anchor="middle">${esc(p.yLabel)}</text>`)
  p.series.forEach((s, i) => {
    if (s.points.length) {
      const d = s.points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(' ')
      out.push(`<polyline fill="none" stroke="${s.color}" stroke-width="2"${s.dashed ? ' stroke-dasharray="6 4"' : ''} points="${d}"/>`)
    }
    const ly = M.top + 10 + i * 18 // top left: every curve starts at the bottom left and rises
    out.push(`<line x1="${X(0) + 10}" x2="${X(0) + 30}" y1="${ly}" y2="${ly}" stroke="${s.color}" stroke-width="2"${s.dashed ? ' stroke-dasharray="6 4"' : ''}/><text x="${X(0) + 36}" y="${ly + 4}">${esc(s.name)}</text>`)
  })
  return out.join('\n')
}

/** The chart as an SVG document: `panels` side by side, `notes` (one line each) under them. */
export function lineChart(panels: ChartPanel[], notes: string[] = []): string {
  const width = W * Math.max(1, panels.length)
  const height = H + notes.length * 16 + (notes.length ? 8 : 0)
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    ...panels.map((p, i) => panel(p, i * W)),
    ...notes.map((n, i) => `<text x="8" y="${H + 12 + i * 16}" fill="#555">${esc(n)}</text>`),
    '</svg>',
    '',
  ].join('\n')
}
