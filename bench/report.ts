/** Writes a run's results: latest.json, a Markdown table and a hand-written SVG bar chart. */
import { type CaseReport, fmt, type Metric } from './lib.js';

export interface CaseOutcome {
  caseNo: number;
  name: string;
  seconds: number;
  report: CaseReport | null;
  error: string | null;
}

function fmtValue(n: number, unit: string): string {
  const digits = Math.abs(n) >= 100 ? 0 : Math.abs(n) >= 10 ? 1 : 2;
  return `${fmt(n, digits)} ${unit}`;
}

export function markdownTable(outcomes: readonly CaseOutcome[]): string {
  const lines = [
    '| case | figure | baseline | ratio | target | met |',
    '| --- | --- | --- | --- | --- | --- |',
  ];
  for (const o of outcomes) {
    if (o.report === null) {
      lines.push(`| ${o.caseNo}. ${o.name} | not run: ${o.error?.split('\n')[0] ?? 'unknown'} | | | | |`);
      continue;
    }
    for (const m of o.report.metrics) {
      lines.push(
        `| ${m.caseNo}. ${m.id} | ${fmtValue(m.figure, m.unit)} (${m.figureLabel}) | ` +
          `${fmtValue(m.baseline, m.unit)} (${m.baselineLabel}) | ${m.ratio}× | ` +
          `${m.better === 'higher' ? '≥' : '≤'} ${m.target}× | ${m.met ? 'yes' : '**no**'} |`,
      );
    }
  }
  const notes = outcomes.flatMap((o) =>
    (o.report?.notes ?? []).map((n) => `- case ${o.caseNo} (${o.name}): ${n}`),
  );
  return `${lines.join('\n')}\n${notes.length > 0 ? `\nNotes:\n${notes.join('\n')}\n` : ''}`;
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** Horizontal bars on a log scale: the ratio (green when met, red when not) and the target mark. */
export function svgChart(metrics: readonly Metric[], title: string): string {
  const rowH = 22;
  const labelW = 260;
  const plotW = 520;
  const top = 40;
  const height = top + metrics.length * rowH + 40;
  const width = labelW + plotW + 90;
  const finite = metrics.flatMap((m) => [m.ratio, m.target]).filter((v) => Number.isFinite(v) && v > 0);
  const lo = 10 ** Math.floor(Math.log10(Math.min(0.1, ...finite)));
  const hi = 10 ** Math.ceil(Math.log10(Math.max(10, ...finite)));
  const x = (v: number) =>
    labelW + (plotW * (Math.log10(Math.max(v, lo)) - Math.log10(lo))) / Math.log10(hi / lo);
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="10" y="20" font-size="14" font-weight="bold">${esc(title)}</text>`,
  ];
  for (let decade = lo; decade <= hi * 1.0001; decade *= 10) {
    for (const mult of [1, 3]) {
      const v = Number((decade * mult).toPrecision(3));
      if (v > hi * 1.0001) continue;
      const gx = x(v).toFixed(1);
      out.push(
        `<line x1="${gx}" y1="${top - 6}" x2="${gx}" y2="${top + metrics.length * rowH}" stroke="#ddd"/>`,
        `<text x="${gx}" y="${top + metrics.length * rowH + 16}" text-anchor="middle" fill="#555">${v}×</text>`,
      );
    }
  }
  metrics.forEach((m, i) => {
    const y = top + i * rowH;
    const ok = Number.isFinite(m.ratio);
    const barEnd = ok ? x(m.ratio) : labelW;
    out.push(
      `<text x="${labelW - 8}" y="${y + 15}" text-anchor="end">${esc(`${m.caseNo}. ${m.id}`)}</text>`,
      `<rect x="${labelW}" y="${y + 4}" width="${Math.max(1, barEnd - labelW).toFixed(1)}" height="${rowH - 8}" fill="${m.met ? '#3a9d5d' : '#d0483e'}"/>`,
      `<line x1="${x(m.target).toFixed(1)}" y1="${y + 1}" x2="${x(m.target).toFixed(1)}" y2="${y + rowH - 1}" stroke="black" stroke-width="2"/>`,
      `<text x="${(Math.max(barEnd, x(m.target)) + 6).toFixed(1)}" y="${y + 15}" fill="#333">${ok ? `${m.ratio}×` : 'n/a'} (${m.better === 'higher' ? '≥' : '≤'}${m.target})</text>`,
    );
  });
  out.push(
    `<text x="${labelW}" y="${height - 8}" fill="#555">ratio vs same-run baseline (log scale); black mark = target; green = met, red = missed</text>`,
    '</svg>',
  );
  return `${out.join('\n')}\n`;
}
