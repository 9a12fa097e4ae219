// One app: its state and scale, releases (rollback), the newest deploy's timeline live
// over SSE (GET .../deploys/{id}/events), live logs with filters (GET .../logs?follow=1)
// and a debug session whose requests open their trace (GET /api/v1/trace/{id}).

import { get, post, del, enc, stream } from './api.js';
import { h, replace, table, badge, flash, when } from './dom.js';
import { PERIOD } from './overview.js';

const OUTCOME = { succeeded: 'ok', running: 'info', rolled_back: 'warn', failed: 'bad' };
const MAX_LINES = 300;

function scaleText(app) {
  const s = app.scale || {};
  const size = s.auto ? `auto ${s.auto.min}–${s.auto.max} (now ${s.instances})`
    : s.instances !== null && s.instances !== undefined ? `${s.instances} instances in total`
      : `${s.per_node} per machine`;
  return `${size} in groups ${(s.groups || []).join(', ')}${app.scale_override ? ' (set at run time)' : ''}`;
}

function timeline(deploy) {
  const start = deploy.history.length ? deploy.history[0][0] : deploy.created_at;
  return h('div', { id: 'timeline' },
    h('p', {}, `Deploy ${deploy.deploy_id} of ${deploy.release} by ${deploy.actor}: `,
      badge(deploy.finished ? deploy.status : `${deploy.status}, ${deploy.stage} (in progress)`,
        deploy.finished ? OUTCOME[deploy.status] || 'info' : 'info'),
      deploy.reason ? ` — ${deploy.reason}` : ''),
    table('Steps per machine', ['machine', 'step', 'old instances', 'new instances', 'error'],
      deploy.steps.map((s) => h('tr', {},
        h('td', {}, s.node), h('td', {}, s.step), h('td', {}, s.old.join(', ') || '–'),
        h('td', {}, s.new.join(', ') || '–'), h('td', {}, s.error || '')))),
    h('ol', { class: 'history', 'aria-label': 'Deploy timeline' },
      deploy.history.map(([at, event, node]) => h('li', {},
        h('span', { class: 'at' }, `+${(at - start).toFixed(2)} s`), ` ${event}`, node ? ` ${node}` : ''))));
}

function logLine(line, onTrace) {
  const time = new Date(line.ts * 1000).toISOString().slice(11, 23);
  const f = line.fields || {};
  if (line.stream === 'proxy' && f.request_id) {
    return h('li', {}, h('button', { type: 'button', class: 'link', onclick: () => onTrace(f.request_id) },
      `${time} ${f.method} ${f.path} → ${f.status} in ${f.duration_ms} ms (${f.instance || 'no instance'})`,
      ` · trace ${f.request_id}`));
  }
  return h('li', { class: line.stream === 'stderr' ? 'stderr' : '' },
    h('span', { class: 'at' }, time), ` ${line.instance} ${line.stream}: `, line.text);
}

export function appPage(main, ctx, name) {
  const writer = ctx.can('apps:write');
  const stops = [];
  let stopped = false;
  let timer = null;
  let shownDeploy = null;
  let stopDeploy = () => {};

  const summary = h('div', {}, h('p', {}, 'Loading…'));
  const releases = h('div', {});
  const deployBox = h('div', { 'aria-live': 'polite' }, h('p', {}, 'No deploy yet.'));
  // tabindex: a scrolling list must be reachable from the keyboard to be scrolled
  const logList = h('ol', { class: 'logs', id: 'log-lines', 'aria-label': 'Log lines', tabindex: '0' });
  const requests = h('ol', { class: 'logs', id: 'debug-requests', 'aria-label': 'Requests', tabindex: '0' });
  const traceBox = h('div', { id: 'trace', 'aria-live': 'polite' });
  const logState = h('p', { class: 'help', id: 'log-state' });

  // ---- scale
  const mode = h('select', { id: 'scale-mode', name: 'mode' },
    h('option', { value: 'per_node' }, 'per machine'), h('option', { value: 'instances' }, 'in total'));
  const count = h('input', { id: 'scale-count', type: 'number', min: '0', max: '1000', value: '1', required: true });
  const scaleForm = writer ? h('form', { class: 'inline', 'aria-label': 'Scale', onsubmit: async (event) => {
    event.preventDefault();
    try {
      const body = { [mode.value]: Number(count.value) };
      const done = await post(`/api/v1/apps/${enc(name)}/scale`, body);
      flash(`Scaling ${done.scale_id} started: ${count.value} ${mode.selectedOptions[0].text}`, 'ok');
      refresh();
    } catch (error) { flash(`Scale refused: ${error.message}`, 'bad'); }
  } }, h('label', { for: 'scale-count' }, 'Instances'), count,
  h('label', { for: 'scale-mode' }, 'counted'), mode, h('button', { type: 'submit' }, 'Scale')) : null;

  // ---- logs
  const filters = {
    stream: h('select', { id: 'log-stream', name: 'stream' },
      ['', 'stdout', 'stderr', 'proxy'].map((s) => h('option', { value: s }, s || 'all streams'))),
    grep: h('input', { id: 'log-grep', name: 'grep', type: 'search', placeholder: 'text' }),
    node: h('input', { id: 'log-node', name: 'node', type: 'search', placeholder: 'machine' }),
    instance: h('input', { id: 'log-instance', name: 'instance', type: 'search', placeholder: 'instance' }),
  };
  let stopLogs = () => {};
  function followLogs() {
    stopLogs();
    logList.replaceChildren();
    const query = new URLSearchParams({ follow: '1', n: '50' });
    for (const [key, input] of Object.entries(filters)) if (input.value) query.set(key, input.value);
    logState.textContent = 'connecting…';
    stopLogs = stream(`/api/v1/apps/${enc(name)}/logs?${query}`, {
      open: (doc) => { logState.textContent = `following on ${doc.nodes.length} machine(s)`; },
      line: (line) => {
        logList.append(logLine(line, showTrace));
        while (logList.children.length > MAX_LINES) logList.firstElementChild.remove();
        logList.scrollTop = logList.scrollHeight;
      },
      gap: (doc) => logList.append(h('li', { class: 'gap' }, `— ${doc.missing === null ? 'some' : doc.missing} line(s) of ${doc.source} on ${doc.node} missing: ${doc.reason}`)),
      dropped: (doc) => logList.append(h('li', { class: 'gap' }, `— ${doc.dropped} line(s) dropped (too fast)`)),
      node: (doc) => { logState.textContent = `${doc.node}: ${doc.state}${doc.error ? ` (${doc.error})` : ''}`; },
      error: () => { logState.textContent = 'stream interrupted; the browser reconnects by itself'; },
    });
  }
  const logForm = h('form', { class: 'inline', 'aria-label': 'Log filters', onsubmit: (event) => { event.preventDefault(); followLogs(); } },
    h('label', { for: 'log-stream' }, 'Stream'), filters.stream,
    h('label', { for: 'log-grep' }, 'Containing'), filters.grep,
    h('label', { for: 'log-node' }, 'Machine'), filters.node,
    h('label', { for: 'log-instance' }, 'Instance'), filters.instance,
    h('button', { type: 'submit' }, 'Apply filters'));

  // ---- debug session and traces
  let stopRequests = () => {};
  const debugState = h('p', { id: 'debug-state' }, 'No debug session opened from this page.');
  async function showTrace(requestId) {
    replace(traceBox, h('p', {}, `Loading trace ${requestId}…`));
    try {
      const doc = await get(`/api/v1/trace/${enc(requestId)}?app=${enc(name)}`);
      replace(traceBox, h('h3', { tabindex: '-1', id: 'trace-title' }, `Trace ${requestId}`),
        h('ol', { class: 'logs' }, doc.lines.map((l) => logLine({ ...l, stream: l.stream === 'proxy' ? 'proxy-record' : l.stream, text: l.text }, showTrace))));
      document.getElementById('trace-title').focus();
    } catch (error) { replace(traceBox, h('p', {}, `Trace not found: ${error.message}`)); }
  }
  const debugControls = writer ? h('p', {},
    h('button', { type: 'button', id: 'debug-open', onclick: async () => {
      try {
        const doc = await post(`/api/v1/apps/${enc(name)}/debug`, { ttl: 600 });
        debugState.textContent = `Debug session open until ${when(doc.until)}: requests appear below as they arrive; choose one for its trace.`;
        stopRequests();
        requests.replaceChildren();
        stopRequests = stream(`/api/v1/apps/${enc(name)}/logs?follow=1&stream=proxy&n=20`, {
          line: (line) => { requests.prepend(logLine(line, showTrace)); while (requests.children.length > 100) requests.lastElementChild.remove(); },
        });
      } catch (error) { flash(`Debug session not opened: ${error.message}`, 'bad'); }
    } }, 'Open debug session (10 min)'), ' ',
    h('button', { type: 'button', id: 'debug-close', onclick: async () => {
      try {
        await del(`/api/v1/apps/${enc(name)}/debug`);
        stopRequests();
        debugState.textContent = 'Debug session closed.';
      } catch (error) { flash(`Debug session not closed: ${error.message}`, 'bad'); }
    } }, 'Close debug session')) : h('p', {}, 'Debug sessions need a token that may write this app.');

  replace(main,
    h('h1', {}, `App ${name}`),
    summary,
    scaleForm ? h('section', { 'aria-labelledby': 'h-scale' }, h('h2', { id: 'h-scale' }, 'Scale'), scaleForm) : null,
    h('section', { 'aria-labelledby': 'h-deploy' }, h('h2', { id: 'h-deploy' }, 'Newest deploy'), deployBox),
    h('section', { 'aria-labelledby': 'h-releases' }, h('h2', { id: 'h-releases' }, 'Releases'), releases),
    h('section', { 'aria-labelledby': 'h-logs' }, h('h2', { id: 'h-logs' }, 'Live logs'), logForm, logState, logList),
    h('section', { 'aria-labelledby': 'h-debug' }, h('h2', { id: 'h-debug' }, 'Debug session'),
      debugControls, debugState, requests, traceBox));

  function watchDeploy(deploy) {
    if (shownDeploy === deploy.deploy_id) return;
    shownDeploy = deploy.deploy_id;
    stopDeploy();
    stopDeploy = () => {};
    if (deploy.finished) {
      get(`/api/v1/apps/${enc(name)}/deploys/${enc(deploy.deploy_id)}`)
        .then((full) => { if (!stopped && shownDeploy === full.deploy_id) replace(deployBox, timeline(full)); })
        .catch((error) => flash(error.message, 'bad'));
      return;
    }
    let close = () => {};
    close = stream(`/api/v1/apps/${enc(name)}/deploys/${enc(deploy.deploy_id)}/events`, {
      deploy: (view) => {
        replace(deployBox, timeline(view));
        if (view.finished) { close(); refresh(); }  // the stream ends: no reconnect
      },
    });
    stopDeploy = () => close();
  }

  async function rollback(release) {
    if (!window.confirm(`Roll ${name} back to ${release}? Every machine switches to it at once.`)) return;
    try {
      const doc = await post(`/api/v1/apps/${enc(name)}/rollback`, { to: release });
      flash(`Rollback to ${release} started (deploy ${doc.deploy_id})`, 'ok');
      refresh();
    } catch (error) { flash(`Rollback refused: ${error.message}`, 'bad'); }
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const [app, rel, deploys] = await Promise.all([
        get(`/api/v1/apps/${enc(name)}`), get(`/api/v1/apps/${enc(name)}/releases`),
        get(`/api/v1/apps/${enc(name)}/deploys`)]);
      if (stopped) return;
      const last = app.last_scaling;
      replace(summary, h('dl', { class: 'facts' },
        h('dt', {}, 'Team'), h('dd', {}, app.team),
        h('dt', {}, 'Serving'), h('dd', { id: 'serving' }, app.current_release || 'nothing yet'),
        h('dt', {}, 'Scale'), h('dd', { id: 'scale' }, scaleText(app)),
        h('dt', {}, 'Placement'), h('dd', { id: 'placement' },
          Object.entries(app.placement).map(([n, k]) => `${n}: ${k}`).join(', ') || 'none',
          app.placement_reason ? ` — ${app.placement_reason}` : ''),
        h('dt', {}, 'Scaling'), h('dd', {}, app.scaling ? `in progress (${app.scaling.id})`
          : last ? `last ${last.outcome}${last.reason ? `: ${last.reason}` : ''}` : 'none')));
      const current = rel.releases.find((r) => r.current);
      replace(releases, table('Releases, newest first', ['release', 'created', 'outcome', 'serving', writer ? 'action' : null].filter(Boolean),
        rel.releases.slice().reverse().map((r) => h('tr', {},
          h('td', {}, r.name), h('td', {}, when(r.created_at)),
          h('td', {}, r.outcome ? badge(r.outcome.replace('_', ' '), OUTCOME[r.outcome]) : 'never deployed'),
          h('td', {}, r.current ? badge('serving', 'ok') : ''),
          writer ? h('td', {}, r.current || !current ? '' : h('button', { type: 'button', onclick: () => rollback(r.name),
            'aria-label': `Roll back to ${r.name}` }, `Roll back to ${r.name}`)) : null))));
      if (deploys.deploys.length) watchDeploy(deploys.deploys[0]);
    } catch (error) {
      if (!stopped) flash(`App not refreshed: ${error.message}`, 'bad');
    }
    if (!stopped) timer = setTimeout(refresh, PERIOD);
  }

  refresh();
  followLogs();
  stops.push(() => stopLogs(), () => stopRequests(), () => stopDeploy());
  return () => { stopped = true; clearTimeout(timer); stops.forEach((f) => f()); };
}
