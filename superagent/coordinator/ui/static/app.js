// The dashboard's shell: login, who is logged in, and the pages by URL fragment
// (#/ overview, #/apps/NAME, #/machines, #/audit). A page is a function that fills
// <main> and returns what stops it (its timers and streams) when another page opens.
// What a page offers follows GET /api/v1/whoami: a control is shown only when the
// token's role holds the permission its API call needs.

import { get, hasSession, setUnauthorizedHandler, ApiError } from './api.js';
import { h, replace, flash } from './dom.js';
import { overview } from './overview.js';
import { appPage } from './apppage.js';
import { machines } from './machines.js';
import { auditPage } from './audit.js';

const main = document.getElementById('main');
let stopPage = () => {};
let session = null;

function can(permission) {
  return session !== null && session.permissions.includes(permission);
}

function loginForm(reason) {
  stopPage();
  stopPage = () => {};
  session = null;
  document.getElementById('nav').hidden = true;
  document.getElementById('logout').hidden = true;
  replace(document.getElementById('who'));
  const input = h('input', { id: 'token', type: 'password', name: 'token', autocomplete: 'off',
                             required: true, spellcheck: 'false', 'aria-describedby': 'login-help' });
  const message = h('p', { id: 'login-error', role: 'alert' }, reason ? `⚠ ${reason}` : '');
  const form = h('form', { class: 'login', onsubmit: async (event) => {
    event.preventDefault();
    message.textContent = '';
    const response = await fetch('/ui/login', {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ token: input.value }) });
    const doc = await response.json().catch(() => ({}));
    if (!response.ok) {
      message.textContent = `⚠ Login refused: ${doc.detail || response.status}`;
      input.select();
      return;
    }
    input.value = '';
    start(doc);
  } },
  h('h1', {}, 'Log in'),
  h('label', { for: 'token' }, 'API token'),
  input,
  h('p', { id: 'login-help', class: 'help' },
    'A token from `superagent tokens create`, or the admin token `superagent up` wrote.',
    ' It stays in this coordinator\'s memory; the browser keeps only a session cookie.'),
  h('button', { type: 'submit' }, 'Log in'),
  message);
  replace(main, form);
  input.focus();
}

function route() {
  stopPage();
  stopPage = () => {};
  if (session === null) return;
  const hash = decodeURIComponent(location.hash.replace(/^#/, '')) || '/';
  const ctx = { who: session, can };
  let found;
  if (hash === '/' || hash === '') found = overview;
  else if (hash.startsWith('/apps/')) found = (m, c) => appPage(m, c, hash.slice('/apps/'.length));
  else if (hash === '/machines') found = machines;
  else if (hash === '/audit') found = auditPage;
  for (const link of document.querySelectorAll('#nav a')) {
    if (link.getAttribute('href') === `#${hash}`) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  if (!found) {
    replace(main, h('h1', {}, 'Not found'), h('p', {}, h('a', { href: '#/' }, 'Back to the overview')));
    return;
  }
  replace(main);
  stopPage = found(main, ctx) || (() => {});
}

function start(who) {
  session = who;
  document.getElementById('nav').hidden = false;
  document.getElementById('logout').hidden = false;
  const teams = who.teams.length ? ` · teams ${who.teams.join(', ')}` : '';
  replace(document.getElementById('who'), `${who.name} (${who.role}${teams})`);
  route();
}

document.getElementById('logout').addEventListener('click', async () => {
  const { post } = await import('./api.js');
  try { await post('/ui/logout'); } catch (error) { /* already over: log in again anyway */ }
  loginForm('Logged out.');
});

setUnauthorizedHandler((reason) => loginForm(`Session over: ${reason}`));
window.addEventListener('hashchange', route);

async function boot() {
  if (!hasSession()) { loginForm(); return; }
  try {
    start(await get('/api/v1/whoami'));
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) {
      flash(`Cannot reach the coordinator: ${error.message}`, 'bad');
      loginForm();
    }
  }
}
boot();
