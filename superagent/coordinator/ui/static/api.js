// The dashboard's only way to the coordinator: the public API under /api/v1, with the
// session cookie (set by /ui/login) instead of a bearer token. Writes echo the CSRF
// token the login left in a readable cookie. A 401 means the session or the token is
// over: the page goes back to the login form with the coordinator's reason.

export class ApiError extends Error {
  constructor(status, doc) {
    super(doc && doc.detail ? doc.detail : `HTTP ${status}`);
    this.status = status;
    this.doc = doc || {};
  }
}

let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

export function csrfToken() {
  const found = document.cookie.split('; ').find((c) => c.startsWith('sa_csrf='));
  return found ? decodeURIComponent(found.slice('sa_csrf='.length)) : '';
}

export function hasSession() { return csrfToken() !== ''; }

export async function call(method, path, body) {
  const options = { method, headers: {}, credentials: 'same-origin' };
  if (method !== 'GET') options.headers['X-CSRF-Token'] = csrfToken();
  if (body !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const text = await response.text();
  let doc;
  try { doc = text ? JSON.parse(text) : {}; } catch { doc = { detail: text }; }
  if (response.status === 401) onUnauthorized(doc.detail || 'not logged in');
  if (!response.ok) throw new ApiError(response.status, doc);
  return doc;
}

export const get = (path) => call('GET', path);
export const post = (path, body) => call('POST', path, body === undefined ? {} : body);
export const del = (path) => call('DELETE', path);

export const enc = encodeURIComponent;

// One EventSource with named events; closed by the returned function.
export function stream(path, handlers) {
  const source = new EventSource(path, { withCredentials: true });
  for (const [name, fn] of Object.entries(handlers)) {
    if (name === 'error') source.onerror = fn;
    // the browser's own 'open' event has no data: only the server's named events do
    else source.addEventListener(name, (event) => { if (event.data !== undefined) fn(JSON.parse(event.data), event); });
  }
  return () => source.close();
}
