// The audit log (GET /api/v1/audit?limit=N, already filtered to what the token may see),
// narrowed here by actor, command, target and outcome.

import { get } from './api.js';
import { h, replace, table, when, flash } from './dom.js';

export function auditPage(main) {
  const inputs = {
    actor: h('input', { id: 'audit-actor', type: 'search' }),
    type: h('input', { id: 'audit-type', type: 'search' }),
    target: h('input', { id: 'audit-target', type: 'search' }),
    outcome: h('input', { id: 'audit-outcome', type: 'search' }),
  };
  const limit = h('select', { id: 'audit-limit' }, ['100', '500', '1000'].map((n) => h('option', { value: n }, n)));
  const body = h('div', {}, h('p', {}, 'Loading…'));
  let entries = [];
  function show() {
    const wanted = Object.entries(inputs).filter(([, i]) => i.value.trim())
      .map(([key, i]) => [key, i.value.trim().toLowerCase()]);
    const rows = entries.filter((e) => wanted.every(([key, text]) => String(e[key] || '').toLowerCase().includes(text)));
    replace(body, table(`Audit log: ${rows.length} of ${entries.length} entries, newest first`,
      ['#', 'when', 'actor', 'command', 'target', 'outcome', 'team'],
      rows.map((e) => h('tr', {}, h('td', { class: 'num' }, e.seq), h('td', {}, when(e.at)), h('td', {}, e.actor),
        h('td', {}, e.type), h('td', {}, e.target), h('td', {}, e.outcome), h('td', {}, e.team || '')))));
  }
  async function load() {
    try {
      entries = (await get(`/api/v1/audit?limit=${limit.value}`)).audit;
      show();
    } catch (error) { flash(`Audit log not loaded: ${error.message}`, 'bad'); }
  }
  const labels = { actor: 'Actor', type: 'Command', target: 'Target', outcome: 'Outcome' };
  replace(main, h('h1', {}, 'Audit log'),
    h('form', { class: 'inline', 'aria-label': 'Audit filters', onsubmit: (event) => { event.preventDefault(); load(); } },
      Object.entries(inputs).map(([key, input]) => {
        input.addEventListener('input', show);
        return [h('label', { for: input.id }, labels[key]), input];
      }),
      h('label', { for: 'audit-limit' }, 'Entries'), limit,
      h('button', { type: 'submit' }, 'Reload')),
    body);
  load();
  return () => {};
}
