// Building the page with the DOM (never innerHTML with data: an app's log line or name is
// text, whatever it holds), and the small formatters every page uses.

export function h(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on')) element.addEventListener(key.slice(2), value);
    else if (key === 'class') element.className = value;
    else element.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

export function replace(target, ...children) {
  target.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

export function table(caption, headers, rows, empty) {
  return h('div', { class: 'scroll' },
    h('table', {},
      h('caption', {}, caption),
      h('thead', {}, h('tr', {}, headers.map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: headers.length }, empty || 'none')))));
}

// A state as a word with a shape beside it, so it reads without colour.
export function badge(text, kind) {
  const marks = { ok: '✓', bad: '✗', warn: '!', info: '•' };
  return h('span', { class: `badge ${kind || 'info'}` }, `${marks[kind || 'info']} ${text}`);
}

export function ago(epoch) {
  if (epoch === null || epoch === undefined) return '–';
  const s = Math.max(0, Date.now() / 1000 - epoch);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function when(epoch) {
  if (epoch === null || epoch === undefined) return '–';
  return new Date(epoch * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
}

export function flash(message, kind) {
  const box = document.getElementById('flash');
  replace(box, h('p', { class: `flash ${kind || 'info'}` }, message));
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => box.replaceChildren(), 8000);
}
