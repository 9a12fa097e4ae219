// The overview: the Raft cluster, the machines and the apps, read every 2 s from
// GET /api/v1/cluster, /nodes, /apps and /traffic (the last two answered from the
// leader's heartbeats: on a follower instances are unknown and traffic is forwarded).

import { get } from './api.js';
import { h, replace, table, badge, flash } from './dom.js';
import { Traffic, sparkline, ms } from './charts.js';

export const PERIOD = 2000;

export function routeLinks(app, nodes) {
  const routes = (app.spec && app.spec.routes) || {};
  const prefix = routes.prefix || '/';
  const links = [];
  const hosts = routes.hosts && routes.hosts.length ? routes.hosts : [null];
  const listens = new Set();
  for (const node of nodes) {
    for (const listen of (node.status && node.status.listen) || []) listens.add(listen);
  }
  for (const listen of listens) {
    for (const host of hosts) {
      const base = host ? `http://${host}${listen.includes(':') ? `:${listen.split(':').pop()}` : ''}`
                        : `http://${listen}`;
      const url = `${base}${prefix.endsWith('/') ? prefix : `${prefix}/`}`;
      links.push(h('a', { href: url, rel: 'noreferrer', target: '_blank' }, url));
    }
  }
  return links.length ? links.flatMap((l, i) => (i ? [h('br'), l] : [l])) : [`${prefix} (no proxy address known)`];
}

function instancesCell(app) {
  if (app.instances === null) return 'unknown on a follower';
  const parts = [];
  for (const [node, list] of Object.entries(app.instances)) {
    const ready = list.filter((i) => i.state === 'ready').length;
    const idle = list.filter((i) => i.state === 'idle').length;  // scaled to zero there
    parts.push(`${node}: ${ready} ready${idle ? `, ${idle} idle` : ''} / ${list.length}`
               + ` (placed ${app.placement[node] || 0})`);
  }
  // serving, starting (a cold start runs) or idle (scaled to zero: a request starts it)
  const state = app.state ? [badge(app.state, app.state === 'serving' ? 'ok' : 'info'), h('br')] : [];
  return parts.length ? [...state, ...parts.flatMap((p, i) => (i ? [h('br'), p] : [p]))] : 'none';
}

export function clusterSection(c) {
  return h('section', { 'aria-labelledby': 'h-cluster' },
    h('h2', { id: 'h-cluster' }, 'Cluster'),
    h('p', {}, c.healthy ? badge('healthy', 'ok') : badge('no quorum or no leader', 'bad'),
      ` leader ${c.leader || 'none'} · term ${c.term} · commit index ${c.commit_index}`,
      ` · applied ${c.last_applied} · answered by ${c.id} · version ${c.version}`),
    c.leader && c.leader !== c.id && c.leader_url
      ? h('p', { class: 'help' }, 'This coordinator follows: running instances, machines\' heartbeats and',
        ' the members\' lag are known on the leader, ', h('a', { href: `${c.leader_url}/ui/` }, `${c.leader_url}/ui/`), '.')
      : null,
    table('Raft members', ['member', 'role', 'connected', 'lag (entries)', 'API'],
      c.members.map((m) => h('tr', {},
        h('td', {}, m.id, m.self ? ' (this one)' : ''),
        h('td', {}, m.leader ? badge('leader', 'ok') : 'follower'),
        h('td', {}, m.connected ? badge('yes', 'ok') : badge('no', 'bad')),
        h('td', {}, m.lag === null ? 'unknown here' : String(m.lag)),
        h('td', {}, m.api_url ? h('a', { href: `${m.api_url}/ui/` }, m.api_url) : '–')))));
}

export function machineRows(nodes) {
  return nodes.map((n) => {
    const figures = n.status && n.status.figures;
    const load = figures ? `${figures.load[0].toFixed(2)} on ${figures.cpus} CPUs` : '–';
    return h('tr', {},
      h('td', {}, n.name),
      h('td', {}, n.groups.join(', '), n.labeled ? ' (labeled)' : ''),
      h('td', {}, n.up ? badge('up', 'ok') : badge('down', 'bad')),
      h('td', {}, n.lifecycle === 'online' ? badge('online', 'ok') : badge(n.lifecycle, 'warn')),
      h('td', {}, `${n.instances_used === null ? '?' : n.instances_used} / ${n.capacity}`),
      h('td', {}, load),
      h('td', {}, n.heartbeat_age === null ? '–' : `${n.heartbeat_age.toFixed(1)} s ago`));
  });
}

export const MACHINE_HEADERS = ['machine', 'groups', 'liveness', 'lifecycle', 'instances / capacity',
                                'load (1 min)', 'last heartbeat'];

export function overview(main) {
  const traffic = new Traffic();
  const body = h('div', {}, h('p', {}, 'Loading…'));
  replace(main, h('h1', {}, 'Overview'), body);
  let timer = null;
  let stopped = false;
  async function tick() {
    try {
      const [cluster, nodes, apps, reading] = await Promise.all([
        get('/api/v1/cluster'), get('/api/v1/nodes'), get('/api/v1/apps'),
        // traffic comes from the leader: without one (an election) the rest still shows
        get('/api/v1/traffic').catch(() => ({ at: Date.now() / 1000, le: [], apps: {} }))]);
      if (stopped) return;
      const figures = traffic.add(reading);
      replace(body,
        clusterSection(cluster),
        h('section', { 'aria-labelledby': 'h-machines' },
          h('h2', { id: 'h-machines' }, 'Machines'),
          table('Machines', MACHINE_HEADERS, machineRows(nodes.nodes), 'no machine has joined')),
        h('section', { 'aria-labelledby': 'h-apps' },
          h('h2', { id: 'h-apps' }, 'Apps'),
          table('Apps', ['app', 'team', 'serving', 'instances per machine', 'routes', 'req/s',
                         'errors', 'p50', 'p99', 'trend'],
            apps.apps.map((app) => {
              const f = figures.get(app.name);
              const series = traffic.series.get(app.name) || [];
              return h('tr', {},
                h('td', {}, h('a', { href: `#/apps/${encodeURIComponent(app.name)}` }, app.name)),
                h('td', {}, app.team),
                h('td', {}, app.current_release || 'nothing'),
                h('td', {}, instancesCell(app)),
                h('td', {}, routeLinks(app, nodes.nodes)),
                h('td', { class: 'num' }, f ? f.rate.toFixed(1) : '–'),
                h('td', { class: 'num' }, f ? `${(f.errors * 100).toFixed(1)} %` : '–'),
                h('td', { class: 'num' }, f ? ms(f.p50) : '–'),
                h('td', { class: 'num' }, f ? ms(f.p99) : '–'),
                h('td', {}, sparkline(series, `requests per second, last ${series.length} readings`)));
            }), 'no app yet: superagent deploy DIR')));
    } catch (error) {
      if (!stopped) flash(`Overview not refreshed: ${error.message}`, 'bad');
    }
    if (!stopped) timer = setTimeout(tick, PERIOD);
  }
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}
