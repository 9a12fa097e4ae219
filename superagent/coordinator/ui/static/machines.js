// The machines: liveness, lifecycle, groups and load from GET /api/v1/nodes every 2 s;
// drain, offline, online (POST /nodes/{node}/{action}) and groups (POST
// /nodes/{node}/groups) for a token with nodes:write.

import { get, post, enc } from './api.js';
import { h, replace, table, flash } from './dom.js';
import { PERIOD, machineRows, MACHINE_HEADERS } from './overview.js';

export function machines(main, ctx) {
  const writer = ctx.can('nodes:write');
  const body = h('div', {}, h('p', {}, 'Loading…'));
  replace(main, h('h1', {}, 'Machines'), body,
    writer ? null : h('p', { class: 'help' }, 'Drain, offline, online and groups need a token with nodes:write (an admin\'s).'));
  let stopped = false;
  let timer = null;

  async function act(node, action) {
    try {
      await post(`/api/v1/nodes/${enc(node)}/${action}`);
      flash(`${node}: ${action} accepted`, 'ok');
    } catch (error) { flash(`${node}: ${action} refused: ${error.message}`, 'bad'); }
    refresh();
  }

  async function label(node, input) {
    const groups = input.value.split(',').map((g) => g.trim()).filter(Boolean);
    try {
      await post(`/api/v1/nodes/${enc(node)}/groups`, { groups });
      flash(`${node}: groups set to ${groups.join(', ')}`, 'ok');
    } catch (error) { flash(`${node}: groups refused: ${error.message}`, 'bad'); }
    refresh();
  }

  async function refresh() {
    clearTimeout(timer);
    // an operator typing groups or on a button keeps it: the table is redrawn after
    const focused = body.contains(document.activeElement) ? document.activeElement : null;
    if (!focused || focused.tagName !== 'INPUT') {
      try {
        const nodes = (await get('/api/v1/nodes')).nodes;
        if (stopped) return;
        const rows = machineRows(nodes);
        if (writer) {
          nodes.forEach((n, i) => {
            const input = h('input', { id: `groups-${n.name}`, value: n.groups.join(','), size: '14',
                                       'aria-label': `Groups of ${n.name}, comma-separated` });
            rows[i].append(h('td', { class: 'actions' },
              ['drain', 'offline', 'online'].map((a) => h('button', {
                type: 'button', onclick: () => act(n.name, a), disabled: n.lifecycle === (a === 'drain' ? 'draining' : a),
                'aria-label': `${a} ${n.name}` }, a[0].toUpperCase() + a.slice(1))),
              h('form', { class: 'inline', onsubmit: (event) => { event.preventDefault(); label(n.name, input); } },
                input, h('button', { type: 'submit', 'aria-label': `Set groups of ${n.name}` }, 'Set groups'))));
          });
        }
        replace(body, table('Machines', writer ? [...MACHINE_HEADERS, 'actions'] : MACHINE_HEADERS, rows,
          'no machine has joined'));
        const again = focused && focused.getAttribute('aria-label');  // keyboard focus stays put
        if (again) {
          const found = [...body.querySelectorAll('[aria-label]')].find((e) => e.getAttribute('aria-label') === again);
          if (found && !found.disabled) found.focus();
        }
      } catch (error) {
        if (!stopped) flash(`Machines not refreshed: ${error.message}`, 'bad');
      }
    }
    if (!stopped) timer = setTimeout(refresh, PERIOD);
  }
  refresh();
  return () => { stopped = true; clearTimeout(timer); };
}
