// quotaflow live dashboard: follows /api/events (server-sent events) and redraws. No framework,
// no CDN: the page works offline, served by the worker itself.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? `${path}?token=${encodeURIComponent(token)}` : path);
const HISTORY_SECONDS = 300;
const COLORS = ["#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2"];
const history = new Map(); // key -> [[time, percent], ...]
const spendHistory = []; // [[time, dollars spent in the last minute by every key], ...]

const $ = (id) => document.getElementById(id);
const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
// budgets are integer micro-dollars in the API; shown in dollars (exact strings where the API gives them)
const usd = (micros) => `$${(micros / 1e6).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 6 })}`;
const figure = (l, n) => (l.money ? usd(n) : fmt(n));

function fullest(row) {
  return row.limits.reduce((m, l) => Math.max(m, l.percent), 0);
}

function render(s) {
  const w = s.worker;
  $("records").textContent = fmt(w.records);
  $("rate").textContent = fmt(w.records_per_s);
  $("keys").textContent = fmt(s.key_count);
  $("throttled-count").textContent = fmt(s.throttled.length);
  const lat = s.decision_latency_ms;
  $("latency").textContent = `${fmt(lat.p50)} / ${fmt(lat.p99)}`;
  $("lag").textContent = fmt(w.consumer_lag);
  $("duplicates").textContent = fmt(w.duplicates);
  $("dlq").textContent = fmt(w.dlq);
  $("updated").textContent = new Date(s.now * 1000).toLocaleTimeString();
  $("spend-day").textContent = `$${s.spend.last_day_usd}`;

  $("spenders").innerHTML = s.top_spenders
    .map((t) => `<div data-spender="${esc(t.key)}"><span>${esc(t.key)}</span><span class="usd">$${esc(t.last_day_usd)}</span></div>`)
    .join("") || `<div class="muted">no spend in the last day</div>`;

  $("throttles").tBodies[0].innerHTML = s.throttled
    .map((t) => `<tr data-key="${esc(t.key)}"><td>${esc(t.key)}</td><td>${esc(t.denied_by)}</td><td>${t.retry_after.toFixed(1)} s</td></tr>`)
    .join("") || `<tr><td colspan="3" class="muted">none</td></tr>`;

  $("consumers").innerHTML = s.top_consumers
    .map((c) => `<div><span>${esc(c.key)}</span><span>${fmt(c.tokens)}</span></div>`)
    .join("") || `<div class="muted">no traffic in the last minute</div>`;

  $("models").innerHTML = Object.entries(s.models)
    .map(([m, v]) => `<div data-model="${esc(m)}"><span>${esc(m)}</span><span>${fmt(v.tokens)}</span></div>`)
    .join("") || `<div class="muted">–</div>`;

  $("key-table").tBodies[0].innerHTML = s.keys
    .map((k) => {
      const limits = k.limits
        .map((l) => {
          const cls = l.percent >= 100 ? "full" : l.percent >= 80 ? "warn" : "";
          // a shadow-mode limit at its ceiling: it would deny, and does not
          const shadow = (k.shadow || []).includes(l.name) ? ` <span class="shadow" title="shadow mode: would deny">shadow</span>` : "";
          return `<div class="limit"><span class="meter"><i class="${cls}" style="width:${Math.min(l.percent, 100)}%"></i></span>` +
            `<span class="used" data-limit="${esc(l.name)}">${figure(l, l.used)} / ${figure(l, l.limit)}</span> <span class="muted">${esc(l.name)}</span>${shadow}</div>`;
        })
        .join("");
      return `<tr data-key="${esc(k.key)}" class="${k.throttled ? "throttled" : ""}"><td>${esc(k.key)}</td><td>${esc(k.policy || "–")}</td>` +
        `<td>${limits}</td><td>${fmt(k.last_minute.requests)}, ${fmt(k.last_minute.tokens)}</td><td>${k.instances}</td>` +
        `<td class="records">${fmt(k.totals.records)}</td></tr>`;
    })
    .join("");

  for (const k of s.keys) {
    const series = history.get(k.key) || [];
    series.push([s.now, fullest(k)]);
    while (series.length && series[0][0] < s.now - HISTORY_SECONDS) series.shift();
    history.set(k.key, series);
  }
  drawChart(s.now, s.keys.slice(0, COLORS.length).map((k) => k.key));
  spendHistory.push([s.now, Number(s.spend.last_minute_usd)]);
  while (spendHistory.length && spendHistory[0][0] < s.now - HISTORY_SECONDS) spendHistory.shift();
  drawSpend(s.now);
}

function drawSpend(now) {
  const W = 900, H = 120, top = 14, bottom = 16;
  const peak = Math.max(...spendHistory.map(([, d]) => d), 0.000001);
  const x = (t) => ((t - (now - HISTORY_SECONDS)) / HISTORY_SECONDS) * W;
  const y = (d) => top + (1 - d / peak) * (H - top - bottom);
  const pts = spendHistory.map(([t, d]) => `${x(t).toFixed(1)},${y(d).toFixed(1)}`).join(" ");
  $("spend-chart").innerHTML = `<text x="4" y="11" font-size="11" fill="#6b7280">peak $${peak.toFixed(6)} a minute</text>` +
    `<polyline fill="none" stroke-width="2" stroke="#059669" points="${pts}"/>`;
}

function drawChart(now, keys) {
  const svg = $("chart");
  const W = 900, H = 220, top = 10, bottom = 20;
  const x = (t) => ((t - (now - HISTORY_SECONDS)) / HISTORY_SECONDS) * W;
  const y = (p) => top + (1 - Math.min(p, 120) / 120) * (H - top - bottom);
  let out = `<line x1="0" x2="${W}" y1="${y(100)}" y2="${y(100)}" stroke="#ef4444" stroke-dasharray="4 4"/>` +
    `<text x="4" y="${y(100) - 3}" font-size="11" fill="#ef4444">limit</text>`;
  keys.forEach((key, i) => {
    const pts = (history.get(key) || []).map(([t, p]) => `${x(t).toFixed(1)},${y(p).toFixed(1)}`).join(" ");
    out += `<polyline fill="none" stroke-width="2" stroke="${COLORS[i]}" points="${pts}"/>`;
  });
  svg.innerHTML = out;
  $("legend").innerHTML = keys.map((k, i) => `<span><i style="background:${COLORS[i]}"></i>${esc(k)}</span>`).join("");
}

function connect() {
  const events = new EventSource(withToken("api/events"));
  events.addEventListener("summary", (e) => {
    $("status").textContent = "live";
    $("status").className = "pill live";
    render(JSON.parse(e.data));
  });
  events.onerror = () => {
    $("status").textContent = "reconnecting…";
    $("status").className = "pill down";
  };
}

connect();
