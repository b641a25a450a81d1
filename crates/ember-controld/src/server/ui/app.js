// The Ember dashboard: polls the client API once a second and redraws.
// No framework and no build step; served from the binary (server/ui.rs).
'use strict';

const POLL_MS = 1000;
const TOKEN_KEY = 'ember-token';
// The consecutive phases, in the order /v1/overview gives them (the last
// of its list is the total); defined in ember_control::phase.
const PHASES = ['queue', 'placement', 'image', 'runner', 'cache_restore', 'process'];
const ACTIVE = new Set(['scheduled', 'starting', 'running']);

const $ = (sel) => document.querySelector(sel);
let selected = null;   // run id whose logs are shown
let logsShown = '';

// The token: from the URL's #token= fragment (never sent to a server),
// else from this tab's sessionStorage, else asked for.
function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

class Unauthorized extends Error {}

async function api(path, as = 'json') {
  const t = token();
  const resp = await fetch(path, { headers: t ? { Authorization: 'Bearer ' + t } : {} });
  if (resp.status === 401) throw new Unauthorized('the client token was refused');
  if (!resp.ok) throw new Error(`${path}: ${resp.status}`);
  return as === 'json' ? resp.json() : resp.text();
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function ms(v) {
  if (v == null) return '–';
  return v < 1000 ? `${v} ms` : `${(v / 1000).toFixed(2)} s`;
}

function bytes(n) {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function ago(t) {
  const s = Math.max(0, (Date.now() - t) / 1000);
  return s < 60 ? `${s.toFixed(0)} s ago` : `${(s / 60).toFixed(0)} min ago`;
}

function runName(id) { return `run-${id}`; }

function renderLegend() {
  $('#legend').replaceChildren(...PHASES.map((p) =>
    el('span', {}, el('i', { class: `p-${p}` }), p)));
}

function renderRuns(runs) {
  const max = Math.max(1, ...runs.map((r) => r.phases[r.phases.length - 1][1] || 0));
  const rows = runs.map((r) => {
    const phases = Object.fromEntries(r.phases);
    const bar = el('div', { class: 'bar' });
    for (const p of PHASES) {
      const v = phases[p];
      if (v == null) continue;
      bar.append(el('span', {
        class: `p-${p}`, title: `${p}: ${ms(v)}`,
        style: `width:${(100 * v / max).toFixed(2)}%`,
      }));
    }
    const tr = el('tr', { 'data-run': runName(r.id), 'data-state': r.state },
      el('td', { text: runName(r.id) }),
      el('td', { class: `state-${r.state}`, text: r.state }),
      el('td', { text: r.deployment || '' }),
      el('td', { text: r.node || '' }),
      el('td', { text: new Date(r.submitted_at).toLocaleTimeString() }),
      el('td', {}, bar),
      el('td', { text: ms(phases.total) }));
    if (selected === r.id) tr.classList.add('selected');
    tr.addEventListener('click', () => { selected = r.id; logsShown = ''; showLogs(); });
    return tr;
  });
  $('#runs tbody').replaceChildren(...rows);
}

async function showLogs() {
  if (selected == null) return;
  const text = await api(`/v1/runs/${selected}/logs`, 'text');
  const out = text.split('\n').filter(Boolean).map((l) => {
    try {
      const rec = JSON.parse(l);
      const raw = atob(rec.data || '');
      const bytesOf = Uint8Array.from(raw, (c) => c.charCodeAt(0));
      return new TextDecoder().decode(bytesOf);
    } catch (_) { return l + '\n'; }
  }).join('');
  $('#logs-panel').hidden = false;
  $('#logs-run').textContent = runName(selected);
  if (out !== logsShown) { $('#logs').textContent = out || '(no output)'; logsShown = out; }
}

function renderLatency(runs) {
  const svg = $('#latency');
  const pts = runs.map((r) => [r.submitted_at, r.phases[r.phases.length - 1][1], r.id])
    .filter(([, v]) => v != null);
  const ns = 'http://www.w3.org/2000/svg';
  const kids = [];
  if (pts.length) {
    const t0 = Math.min(...pts.map((p) => p[0])), t1 = Math.max(...pts.map((p) => p[0]));
    const vmax = Math.max(1, ...pts.map((p) => p[1]));
    const x = (t) => 30 + (t1 > t0 ? (600 * (t - t0)) / (t1 - t0) : 300);
    const y = (v) => 170 - (150 * v) / vmax;
    const label = document.createElementNS(ns, 'text');
    label.setAttribute('x', 2); label.setAttribute('y', 14); label.setAttribute('font-size', 11);
    label.textContent = ms(vmax);
    kids.push(label);
    for (const [t, v, id] of pts) {
      const c = document.createElementNS(ns, 'circle');
      c.setAttribute('cx', x(t).toFixed(1)); c.setAttribute('cy', y(v).toFixed(1));
      c.setAttribute('r', 3); c.setAttribute('fill', '#5e81ac');
      c.setAttribute('data-run', runName(id));
      const title = document.createElementNS(ns, 'title');
      title.textContent = `${runName(id)}: ${ms(v)}`;
      c.append(title);
      kids.push(c);
    }
  }
  svg.replaceChildren(...kids);
}

// The text format's histogram samples of ember_control_run_start_seconds.
function parseHistograms(text) {
  const byPhase = {};
  const re = /^ember_control_run_start_seconds_bucket\{phase="([^"]+)",le="([^"]+)"\} (\S+)$/;
  for (const line of text.split('\n')) {
    const m = line.match(re);
    if (!m) continue;
    (byPhase[m[1]] ||= []).push([m[2], Number(m[3])]);
  }
  return byPhase;
}

function renderHistograms(byPhase) {
  const boxes = Object.entries(byPhase).map(([phase, buckets]) => {
    // Cumulative to per-bucket counts.
    const counts = buckets.map(([, c], i) => c - (i ? buckets[i - 1][1] : 0));
    const top = Math.max(1, ...counts);
    const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
    const bars = el('div', { class: 'bars' }, ...counts.map((c, i) => el('div', {
      title: `≤ ${buckets[i][0]} s: ${c}`,
      style: `height:${((100 * c) / top).toFixed(1)}%`,
    })));
    return el('div', { class: 'histogram', 'data-phase': phase, 'data-count': String(total) },
      el('div', { class: 'title', text: `${phase} (${total} runs)` }),
      bars,
      el('div', { class: 'axis' },
        el('span', { text: buckets.length ? `${buckets[0][0]} s` : '' }),
        el('span', { text: '+Inf' })));
  });
  $('#histograms').replaceChildren(...boxes);
}

function renderNodes(nodes, runs) {
  const active = {};
  for (const r of runs) if (r.node && ACTIVE.has(r.state)) active[r.node] = (active[r.node] || 0) + 1;
  $('#nodes tbody').replaceChildren(...nodes.map((n) => {
    const inv = n.inventory || {};
    const idle = Object.values(inv.idle_runners || {}).reduce((a, b) => a + b, 0);
    return el('tr', { 'data-node': n.id },
      el('td', { text: n.id }),
      el('td', { text: String(n.slots) }),
      el('td', { text: String(active[n.id] || 0) }),
      el('td', { text: String(idle) }),
      el('td', { text: String(Object.keys(inv.images || {}).length) }),
      el('td', { text: bytes(inv.free_disk_bytes || 0) }),
      el('td', { text: ago(n.last_heartbeat) }));
  }));
}

function renderDeployments(deps) {
  $('#deployments tbody').replaceChildren(...deps.map((d) => el('tr', { 'data-deployment': d.name },
    el('td', { text: d.name }),
    el('td', { text: String(d.warm_runners) }),
    el('td', { text: String(d.idle_runners) }),
    el('td', { text: String(d.queued) }))));
}

function renderCache(c) {
  const box = $('#cache');
  if (!c) { box.textContent = 'no cache configured'; return; }
  if (c.error) { box.textContent = `${c.url}: ${c.error}`; return; }
  const ratio = c.hit_ratio == null ? '–' : `${(100 * c.hit_ratio).toFixed(1)} %`;
  box.replaceChildren(
    el('div', { id: 'cache-ratio', text: `hit ratio ${ratio} (${c.hits} hits, ${c.misses} misses)` }),
    el('div', { text: `upstream ${bytes(c.upstream_bytes)}, served ${bytes(c.served_bytes)}` }),
    el('div', { class: 'muted', text: c.url }));
}

// A timer tick skips while a poll is in flight (a slow server is not
// piled on); a filter change polls at once, and then only the newest poll
// draws, so a stale answer never overwrites a filtered one.
let pollSeq = 0;
let inFlight = 0;

async function poll() {
  const seq = ++pollSeq;
  inFlight += 1;
  try { await pollOnce(seq); } finally { inFlight -= 1; }
}

async function pollOnce(seq) {
  const q = new URLSearchParams();
  if ($('#filter-state').value) q.set('state', $('#filter-state').value);
  if ($('#filter-deployment').value.trim()) q.set('deployment', $('#filter-deployment').value.trim());
  try {
    const [overview, nodes, metrics] = await Promise.all([
      api(`/v1/overview?${q}`), api('/v1/nodes'), api('/metrics', 'text'),
    ]);
    if (seq !== pollSeq) return;
    renderRuns(overview.runs);
    renderLatency(overview.runs);
    renderHistograms(parseHistograms(metrics));
    renderNodes(nodes, overview.runs);
    renderDeployments(overview.deployments);
    renderCache(overview.cache);
    if (selected != null) await showLogs();
    $('#status').textContent = `updated ${new Date().toLocaleTimeString()}`;
    $('#status').className = '';
    $('#login').hidden = true;
  } catch (e) {
    $('#status').textContent = e.message;
    $('#status').className = 'error';
    if (e instanceof Unauthorized) $('#login').hidden = false;
  }
}

$('#login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $('#token').value);
  poll();
});
for (const f of ['#filter-state', '#filter-deployment']) $(f).addEventListener('input', poll);
renderLegend();
poll();
setInterval(() => { if (!inFlight) poll(); }, POLL_MS);
