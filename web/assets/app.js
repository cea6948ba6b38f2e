// NovaCron dashboard: a small single-page app over the REST API of the same origin.
// No framework and no build step: views are functions that build DOM nodes with `h()` (never
// innerHTML with data, so nothing from the API is ever parsed as markup). Routing is by URL hash,
// so the server only serves `/`. Live updates come from the event stream when the node offers it
// (`/api/v1/events`), else from polling every 2 s.
'use strict';

const API = '/api/v1';
const POLL_MS = 2000;
const POLL_WITH_EVENTS_MS = 10000;
const PAGE_SIZE = 25;
const SESSION_KEY = 'novacron.session';
const OPS_KEY = 'novacron.ops';
const VM_STATES = ['pending', 'scheduled', 'starting', 'running', 'stopping', 'stopped', 'migrating', 'failed', 'deleting'];
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

const S = {
  session: null,      // {token, expires_at, sub, name, tenant}
  role: null,         // admin | tenant-admin | operator | viewer | null when unknown
  cluster: null,      // last GET /cluster
  clusterError: null,
  events: 'unknown',  // 'live' when the event stream is connected, 'absent' on 404, else 'unknown'
  lastEventId: null,
  features: {},       // endpoint name -> false when it answered 404
  view: null,         // {name, refresh?}
  ops: [],            // recent operations started from this browser tab
  expiryTimer: null,
  pollTimer: null,
  streamAbort: null,
  refreshTimer: null,
};

// ---------------------------------------------------------------- DOM helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}
function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (sel) => document.querySelector(sel);
function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }

function say(text) {
  // Screen readers hear short status changes through the polite live region.
  const live = $('#live-status');
  live.textContent = '';
  setTimeout(() => { live.textContent = text; }, 30);
}

function stateClass(s) {
  if (['running', 'up', 'succeeded', 'voter'].includes(s)) return 'ok';
  if (['failed', 'down'].includes(s)) return 'bad';
  if (['stopped', 'learner', 'witness'].includes(s)) return 'muted';
  if (['suspect', 'migrating', 'deleting', 'stopping'].includes(s)) return 'warn';
  return '';
}
const badge = (s) => h('span', { class: 'badge ' + stateClass(s) }, s ?? '—');

function fmtTime(ms) {
  if (!ms) return '—';
  const d = new Date(ms);
  return isNaN(d) ? String(ms) : d.toLocaleString();
}
function fmtMiB(m) {
  if (m === null || m === undefined) return '—';
  return m >= 1024 ? (m / 1024).toFixed(m % 1024 ? 1 : 0) + ' GiB' : m + ' MiB';
}

// ---------------------------------------------------------------- API client

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.title)) || ('HTTP ' + status));
    this.status = status;
    this.code = (body && body.code) || (status === 0 ? 'unreachable' : 'http_' + status);
    this.detail = body && body.detail;
  }
}

async function api(method, path, body, opts = {}) {
  const headers = { Accept: 'application/json' };
  if (S.session) headers.Authorization = 'Bearer ' + S.session.token;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (opts.idempotent) headers['Idempotency-Key'] = crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
  let r;
  try {
    r = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, { detail: 'This node did not answer (' + e.message + ').' });
  }
  const text = await r.text();
  let data = null;
  if (text) { try { data = JSON.parse(text); } catch { data = { detail: text }; } }
  if (!r.ok) {
    const err = new ApiError(r.status, data);
    if (r.status === 401 && S.session && !opts.login) expireSession('Your session has expired. Please log in again.');
    throw err;
  }
  return data;
}

// An endpoint that a node may not offer yet: remember the 404 and let the caller degrade.
async function optional(name, fn) {
  if (S.features[name] === false) return null;
  try {
    const v = await fn();
    S.features[name] = true;
    return v;
  } catch (e) {
    if (e.status === 404 || e.status === 405) { S.features[name] = false; applyFeatures(); return null; }
    throw e;
  }
}

function errorBox(e) {
  const quota = e.code === 'quota_exceeded';
  return h('div', { class: 'alert', role: 'alert' },
    h('strong', {}, quota ? 'Quota exceeded: ' : 'Error: '), e.detail || e.message, ' ',
    h('span', { class: 'code' }, '(' + e.code + ')'));
}

// ---------------------------------------------------------------- session

function decodeJwt(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part + '==='.slice((part.length + 3) % 4)));
  } catch { return {}; }
}

function loadSession() {
  try {
    const s = JSON.parse(sessionStorage.getItem(SESSION_KEY) || 'null');
    if (s && s.token && s.expires_at * 1000 > Date.now()) return s;
  } catch { /* a corrupted entry is treated as no session */ }
  sessionStorage.removeItem(SESSION_KEY);
  return null;
}

function startSession(s) {
  S.session = s;
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(s));
  clearTimeout(S.expiryTimer);
  const left = s.expires_at * 1000 - Date.now();
  // setTimeout's limit is about 24 days; longer tokens are checked again by the 401 handler.
  S.expiryTimer = setTimeout(() => expireSession('Your session has expired. Please log in again.'), Math.min(left, 2 ** 31 - 1));
}

function endSession() {
  S.session = null; S.role = null; S.cluster = null;
  sessionStorage.removeItem(SESSION_KEY);
  // The operations list names VMs of this user's tenant: the next user of the tab must not see it.
  S.ops = []; sessionStorage.removeItem(OPS_KEY); renderOps();
  clearTimeout(S.expiryTimer); clearTimeout(S.pollTimer);
  if (S.streamAbort) S.streamAbort.abort();
  S.streamAbort = null; S.events = 'unknown';
  $('#top').hidden = true; $('#banner').hidden = true; $('#ops').hidden = true;
}

let loginNotice = null;
function expireSession(msg) {
  if (!S.session) return;
  endSession();
  loginNotice = msg;
  const here = location.hash;
  if (!here.startsWith('#/login')) sessionStorage.setItem('novacron.next', here);
  location.hash = '#/login';
}

async function learnRole() {
  // The token carries the user id but not the role: ask for our own user record.
  try {
    const me = await api('GET', '/users/' + encodeURIComponent(S.session.sub));
    S.role = me.role || null;
  } catch {
    S.role = null;
  }
  if (!S.role) {
    // A user that may list tenants is an admin; anyone else is treated as tenant-scoped.
    try { await api('GET', '/tenants?limit=1'); S.role = 'admin'; } catch { S.role = 'viewer'; }
  }
  applyFeatures();
}

function isAdmin() { return S.role === 'admin'; }
function canManageUsers() { return S.role === 'admin' || S.role === 'tenant-admin'; }
function canOperate() { return S.role !== 'viewer'; }

function applyFeatures() {
  document.querySelectorAll('[data-admin]').forEach((el) => { el.hidden = !isAdmin(); });
  document.querySelectorAll('[data-manager]').forEach((el) => { el.hidden = !canManageUsers(); });
  document.querySelectorAll('[data-feature]').forEach((el) => { el.hidden = S.features[el.dataset.feature] === false; });
  if (S.session) $('#who').textContent = (S.session.name || S.session.sub) + (S.role ? ' · ' + S.role : '');
}

// ---------------------------------------------------------------- cluster health and live updates

function memberName(id) {
  const m = S.cluster && S.cluster.members && S.cluster.members.find((x) => String(x.id) === String(id));
  return m ? m.name : (id === null || id === undefined ? '—' : String(id));
}

function updateBanner() {
  const b = $('#banner');
  let text = null; let cls = 'bad';
  if (S.clusterError) {
    text = S.clusterError.status === 0
      ? 'This node is not answering. Retrying…'
      : 'Cluster status unavailable: ' + (S.clusterError.detail || S.clusterError.message);
  } else if (S.cluster) {
    const down = (S.cluster.members || []).filter((m) => m.state && m.state !== 'up');
    if (S.cluster.leader === null || S.cluster.leader === undefined) {
      text = 'No leader: the cluster has lost quorum. Changes are refused until a majority of voters is back.';
    } else if (down.length) {
      cls = 'warn';
      text = down.map((m) => 'Node ' + m.name + ' is ' + m.state).join('; ') + '.';
    }
  }
  const changed = b.textContent !== (text || '');
  b.hidden = !text;
  b.className = 'banner ' + cls;
  b.textContent = text || '';
  if (changed && text) say(text);
}

async function pollCluster() {
  clearTimeout(S.pollTimer);
  if (!S.session) return;
  try {
    S.cluster = await api('GET', '/cluster');
    S.clusterError = null;
  } catch (e) {
    if (!S.session) return;
    S.clusterError = e;
  }
  updateBanner();
  if (S.events !== 'live') refreshView();
  else if (S.view && S.view.name === 'cluster') refreshView();
  S.pollTimer = setTimeout(pollCluster, S.events === 'live' ? POLL_WITH_EVENTS_MS : POLL_MS);
}

function refreshView() {
  // Coalesce bursts of events into one refresh of the current view.
  clearTimeout(S.refreshTimer);
  S.refreshTimer = setTimeout(() => {
    if (S.view && S.view.refresh) S.view.refresh().catch(() => {});
  }, 150);
}

// The event stream is read with fetch rather than EventSource, because EventSource cannot send
// the Authorization header.
async function streamEvents() {
  if (!S.session || S.streamAbort) return;
  const ctl = new AbortController();
  S.streamAbort = ctl;
  let retryMs = 3000;
  try {
    const headers = { Accept: 'text/event-stream', Authorization: 'Bearer ' + S.session.token };
    if (S.lastEventId) headers['Last-Event-ID'] = S.lastEventId;
    const r = await fetch(API + '/events', { headers, signal: ctl.signal });
    if (r.status === 404) { S.events = 'absent'; retryMs = 60000; return; }
    if (r.status === 401) { expireSession('Your session has expired. Please log in again.'); return; }
    if (!r.ok || !r.body) return;
    S.events = 'live';
    say('Live updates connected');
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let i;
      while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i).replace(/^\r?\n\r?\n/, '');
        onEventBlock(block);
      }
    }
  } catch { /* aborted or the connection dropped: reconnect below */ } finally {
    if (S.streamAbort === ctl) S.streamAbort = null;
    if (S.events === 'live') S.events = 'unknown';
    if (S.session && !ctl.signal.aborted) setTimeout(streamEvents, retryMs);
  }
}

function onEventBlock(block) {
  let data = ''; let type = 'message';
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith(':')) continue;
    const idx = line.indexOf(':');
    const field = idx < 0 ? line : line.slice(0, idx);
    const val = idx < 0 ? '' : line.slice(idx + 1).replace(/^ /, '');
    if (field === 'id') S.lastEventId = val;
    else if (field === 'data') data += (data ? '\n' : '') + val;
    else if (field === 'event') type = val;
  }
  if (!data && type === 'message') return;
  let ev = null;
  try { ev = JSON.parse(data); } catch { ev = null; }
  const text = JSON.stringify(ev || {});
  for (const op of S.ops) if (text.includes(op.id) && !isTerminal(op.state)) pollOp(op.id);
  refreshView();
}

// ---------------------------------------------------------------- operations

function isTerminal(s) { return s === 'succeeded' || s === 'failed'; }

function saveOps() { sessionStorage.setItem(OPS_KEY, JSON.stringify(S.ops.slice(0, 30))); }
function loadOps() { try { S.ops = JSON.parse(sessionStorage.getItem(OPS_KEY) || '[]'); } catch { S.ops = []; } }

function trackOp(op, label, target) {
  if (!op || !op.id) return;
  S.ops = S.ops.filter((o) => o.id !== op.id);
  S.ops.unshift({ id: op.id, kind: op.kind, state: op.state || 'pending', error: op.error, label, target: target || op.target, at: Date.now() });
  saveOps(); renderOps();
  say(label + ': ' + (op.state || 'pending'));
  pollOp(op.id);
}

const opPolls = new Set();
async function pollOp(id) {
  if (opPolls.has(id)) return;
  opPolls.add(id);
  try {
    for (let i = 0; i < 600 && S.session; i++) {
      let op;
      try { op = await api('GET', '/operations/' + encodeURIComponent(id)); } catch (e) {
        if (e.status === 404 || e.status === 401) break;
        op = null;
      }
      const mine = S.ops.find((o) => o.id === id);
      if (op && mine && (mine.state !== op.state || mine.error !== op.error)) {
        mine.state = op.state; mine.error = op.error;
        saveOps(); renderOps(); refreshView();
        say(mine.label + ': ' + op.state + (op.error ? ' (' + op.error + ')' : ''));
      }
      if (op && isTerminal(op.state)) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
  } finally { opPolls.delete(id); }
}

function opItem(o) {
  return h('li', {}, badge(o.state), h('span', {}, o.label), o.error ? h('span', { class: 'muted' }, '— ' + o.error) : null);
}

function renderOps() {
  const box = $('#ops');
  const recent = S.ops.filter((o) => !isTerminal(o.state) || Date.now() - o.at < 120000).slice(0, 8);
  box.hidden = !S.session || recent.length === 0;
  const list = clear($('#ops-list'));
  recent.forEach((o) => list.append(opItem(o)));
}

// ---------------------------------------------------------------- confirmation dialog

function confirmAction(text, okLabel) {
  const dlg = $('#confirm');
  $('#confirm-text').textContent = text;
  $('#confirm-ok').textContent = okLabel || 'Confirm';
  return new Promise((resolve) => {
    dlg.addEventListener('close', () => resolve(dlg.returnValue === 'ok'), { once: true });
    dlg.returnValue = '';
    dlg.showModal();
  });
}

// ---------------------------------------------------------------- routing

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/cluster';
  const [path, qs] = raw.split('?');
  return { parts: path.split('/').filter(Boolean), query: new URLSearchParams(qs || '') };
}

function setHashQuery(base, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  const s = q.toString();
  location.hash = base + (s ? '?' + s : '');
}

async function route() {
  const { parts, query } = parseHash();
  const main = $('#main');
  if (!S.session && parts[0] !== 'login') { location.hash = '#/login'; return; }
  if (S.session && parts[0] === 'login') { location.hash = '#/cluster'; return; }
  const name = parts[0] || 'cluster';
  document.querySelectorAll('[data-nav]').forEach((a) => {
    if (a.dataset.nav === name) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  });
  $('#nav').classList.remove('open');
  $('#menu-toggle').setAttribute('aria-expanded', 'false');
  S.view = { name };
  clear(main);
  const views = { login: viewLogin, cluster: viewCluster, nodes: viewNodes, vms: viewVms, sites: viewSites, tenants: viewTenants, users: viewUsers, audit: viewAudit };
  const fn = views[name] || viewNotFound;
  try {
    await fn(main, parts.slice(1), query);
  } catch (e) {
    main.append(errorBox(e));
  }
  const h1 = main.querySelector('h1');
  document.title = (h1 ? h1.textContent + ' · ' : '') + 'NovaCron';
}

function viewNotFound(main) {
  main.append(h('h1', {}, 'Not found'), h('p', {}, 'No such page. ', h('a', { href: '#/cluster' }, 'Go to the cluster view.')));
}

// ---------------------------------------------------------------- login

function viewLogin(main) {
  const err = h('div', {});
  const user = h('input', { id: 'login-user', name: 'username', autocomplete: 'username', required: true, autofocus: true });
  const pass = h('input', { id: 'login-pass', name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const totp = h('input', { id: 'login-totp', name: 'totp', inputmode: 'numeric', autocomplete: 'one-time-code', pattern: '[0-9]{6}', 'aria-describedby': 'totp-hint' });
  const btn = h('button', { type: 'submit' }, 'Log in');
  if (loginNotice) { err.append(h('div', { class: 'alert info', role: 'status' }, loginNotice)); loginNotice = null; }
  const form = h('form', { class: 'panel', 'aria-labelledby': 'login-title', novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    clear(err);
    if (!user.value || !pass.value) { err.append(errorBox(new ApiError(400, { code: 'validation_failed', detail: 'Enter your user name and password.' }))); return; }
    btn.disabled = true; btn.textContent = 'Logging in…';
    try {
      const body = { username: user.value, password: pass.value };
      if (totp.value) body.totp = totp.value;
      const r = await api('POST', '/auth/login', body, { login: true });
      const claims = decodeJwt(r.token);
      startSession({ token: r.token, expires_at: r.expires_at, sub: claims.sub, name: claims.name || user.value, tenant: claims.tenant });
      await onLoggedIn();
      const next = sessionStorage.getItem('novacron.next');
      sessionStorage.removeItem('novacron.next');
      location.hash = next && !next.startsWith('#/login') ? next : '#/cluster';
    } catch (e) {
      if (/totp/.test(e.code)) totp.focus();
      err.append(errorBox(e));
      pass.select();
    } finally { btn.disabled = false; btn.textContent = 'Log in'; }
  } },
  h('div', { class: 'field' }, h('label', { for: 'login-user' }, 'User name'), user),
  h('div', { class: 'field' }, h('label', { for: 'login-pass' }, 'Password'), pass),
  h('div', { class: 'field' }, h('label', { for: 'login-totp' }, 'One-time code'), totp,
    h('div', { class: 'hint', id: 'totp-hint' }, 'Only if two-factor authentication is enrolled for you.')),
  err, btn);
  main.append(h('div', { class: 'login' }, h('h1', { id: 'login-title' }, 'Log in to NovaCron'), form));
  user.focus();
}

async function onLoggedIn() {
  $('#top').hidden = false;
  applyFeatures();
  await learnRole();
  renderOps();
  S.ops.filter((o) => !isTerminal(o.state)).forEach((o) => pollOp(o.id));
  pollCluster();
  streamEvents();
  // Learn once whether this node offers the audit log, to show or hide its menu entry.
  optional('audit', () => api('GET', '/audit?limit=1')).catch(() => {});
}

// ---------------------------------------------------------------- cluster

function stat(k, v) { return h('div', { class: 'stat' }, h('div', { class: 'k' }, k), h('div', { class: 'v' }, v)); }

function viewCluster(main) {
  const body = h('div', {});
  main.append(h('h1', {}, 'Cluster'), body);
  const render = () => {
    clear(body);
    const c = S.cluster;
    if (!c) { body.append(S.clusterError ? errorBox(S.clusterError) : h('p', { class: 'muted' }, 'Loading…')); return; }
    const members = c.members || [];
    const up = members.filter((m) => !m.state || m.state === 'up').length;
    body.append(h('div', { class: 'stats' },
      stat('Leader', c.leader_name || (c.leader === null || c.leader === undefined ? 'none' : memberName(c.leader))),
      stat('Term', c.term ?? '—'),
      stat('Commit index', c.commit_index ?? '—'),
      stat('Applied here', c.last_applied ?? '—'),
      stat('Members up', up + ' / ' + members.length),
      stat('Updates', S.events === 'live' ? 'live (events)' : 'polling every 2 s')));
    const rows = members.map((m) => h('tr', {},
      h('td', { 'data-label': 'Name' }, h('strong', {}, m.name), String(m.id) === String(c.leader) ? h('span', { class: 'badge ok', style: null }, ' leader') : null),
      h('td', { 'data-label': 'ID', class: 'mono' }, m.id),
      h('td', { 'data-label': 'Role' }, badge(m.role)),
      h('td', { 'data-label': 'Health' }, badge(m.state || 'unknown')),
      h('td', { 'data-label': 'API', class: 'mono' }, m.api_addr || '—'),
      h('td', { 'data-label': 'Matched', class: 'num' }, m.matched_index ?? '—'),
      h('td', { 'data-label': 'Applied', class: 'num' }, m.last_applied ?? '—'),
      h('td', { 'data-label': 'Behind', class: 'num' }, (c.commit_index !== undefined && m.last_applied !== undefined && m.last_applied !== null) ? Math.max(0, c.commit_index - m.last_applied) : '—')));
    body.append(h('h2', {}, 'Members'), h('div', { class: 'table-wrap' }, h('table', { class: 'cards' },
      h('caption', { class: 'live' }, 'Cluster members'),
      h('thead', {}, h('tr', {}, ['Name', 'ID', 'Role', 'Health', 'API address', 'Matched index', 'Applied index', 'Behind commit'].map((t, i) => h('th', { scope: 'col', class: i >= 5 ? 'num' : null }, t)))),
      h('tbody', {}, rows))),
    h('p', { class: 'muted' }, 'Cluster ', h('span', { class: 'mono' }, c.cluster_id || '—'), '. Every node serves this dashboard and the API.'));
  };
  S.view.refresh = async () => render();
  render();
}

// ---------------------------------------------------------------- nodes

async function viewNodes(main) {
  const body = h('div', {});
  // Outside the re-rendered table, so a live refresh does not close an open preview.
  const preview = h('div', { 'aria-live': 'polite' });
  main.append(h('h1', {}, 'Nodes'), preview, body);
  const render = async () => {
    const nodes = await optional('nodes', () => api('GET', '/nodes'));
    clear(body);
    if (nodes === null) {
      body.append(h('div', { class: 'alert info', role: 'status' }, 'Node capacity, usage and drain are not available on this cluster yet; showing Raft members.'));
      const members = (S.cluster && S.cluster.members) || [];
      body.append(h('table', { class: 'cards' },
        h('thead', {}, h('tr', {}, ['Name', 'Role', 'Health', 'API address'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, members.map((m) => h('tr', {},
          h('td', { 'data-label': 'Name' }, m.name), h('td', { 'data-label': 'Role' }, badge(m.role)),
          h('td', { 'data-label': 'Health' }, badge(m.state || 'unknown')), h('td', { 'data-label': 'API', class: 'mono' }, m.api_addr || '—'))))));
      return;
    }
    const items = Array.isArray(nodes) ? nodes : (nodes.items || []);
    const kv = (o) => o && typeof o === 'object' ? Object.entries(o).map(([k, v]) => h('span', { class: 'tag' }, k + ': ' + (typeof v === 'object' ? JSON.stringify(v) : v))) : '—';
    body.append(h('div', { class: 'table-wrap' }, h('table', { class: 'cards' },
      h('thead', {}, h('tr', {}, ['Name', 'Health', 'Schedulable', 'Capacity', 'Usage', 'Labels', 'Actions'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, items.map((n) => {
        const name = n.name || (n.member && n.member.name) || String(n.id);
        const sched = n.schedulable !== false;
        const act = isAdmin() ? h('button', { type: 'button', class: 'small secondary', 'aria-label': (sched ? 'Drain ' : 'Undrain ') + name, onclick: async () => {
          const verb = sched ? 'drain' : 'undrain';
          if (sched) { drainPreview(preview, n, name); return; }
          const ok = await confirmAction(sched ? 'Drain node ' + name + '? Its VMs will be moved to other nodes.' : 'Make node ' + name + ' schedulable again?', sched ? 'Drain' : 'Undrain');
          if (!ok) return;
          try { const r = await api('POST', '/nodes/' + encodeURIComponent(n.id) + '/' + verb, undefined, { idempotent: true }); if (r && r.operation) trackOp(r.operation, verb + ' ' + name); say('Node ' + name + ': ' + verb + ' requested'); refreshView(); } catch (e) { body.prepend(errorBox(e)); }
        } }, sched ? 'Drain' : 'Undrain') : null;
        return h('tr', {},
          h('td', { 'data-label': 'Name' }, h('strong', {}, name)),
          h('td', { 'data-label': 'Health' }, badge(n.state || 'unknown')),
          h('td', { 'data-label': 'Schedulable' }, sched ? 'yes' : badge('drained')),
          h('td', { 'data-label': 'Capacity' }, kv(n.capacity)),
          // Usage comes either as an object or as the flat reservation counts of `GET /nodes`.
          h('td', { 'data-label': 'Usage' }, n.usage ? kv(n.usage) : (n.vms === undefined ? '—'
            : n.vms + ' VMs · ' + (n.vcpus_used ?? 0) + ' vCPUs · ' + fmtMiB(n.memory_mib_used ?? 0))),
          h('td', { 'data-label': 'Labels' }, n.labels && Object.keys(n.labels).length ? kv(n.labels) : '—'),
          h('td', {}, act));
      })))));
  };
  S.view.refresh = render;
  await render();
}

// What draining `n` would move, from the scheduler's simulation, then drain or cancel.
async function drainPreview(box, n, name) {
  const result = h('div', {}, h('p', { class: 'muted' }, 'Asking the scheduler what would move…'));
  const go = h('button', { type: 'button', class: 'danger', id: 'drain-confirm', onclick: async () => {
    go.disabled = true;
    try {
      const r = await api('POST', '/nodes/' + encodeURIComponent(n.id) + '/drain', undefined, { idempotent: true });
      if (r && r.operation) trackOp(r.operation, 'drain ' + name);
      say('Node ' + name + ': drain requested');
      clear(box);
      refreshView();
    } catch (e) { go.disabled = false; result.prepend(errorBox(e)); }
  } }, 'Drain ' + name);
  const cancel = h('button', { type: 'button', class: 'secondary', onclick: () => clear(box) }, 'Cancel');
  clear(box).append(h('section', { class: 'panel', id: 'drain-preview', 'aria-labelledby': 'drain-title' },
    h('h2', { id: 'drain-title' }, 'Drain ' + name + '?'),
    h('p', {}, 'Its VMs will be live-migrated to other nodes and it takes no new ones until undrained.'),
    result, h('div', { class: 'actions' }, go, cancel)));
  cancel.focus();
  try {
    const sim = await api('POST', '/scheduler/simulate', { kind: 'drain', node: String(n.id) });
    clear(result).append(h('h3', {}, 'What the scheduler would do'), jsonView(sim));
  } catch (e) {
    clear(result).append(h('p', { class: 'muted', role: 'status' }, e.status === 404 || e.status === 405 || e.status === 501
      ? 'A preview of the moves is not available on this cluster yet.'
      : 'No preview: ' + (e.detail || e.message)));
  }
}

// ---------------------------------------------------------------- VMs

async function vmAction(vm, verb, after) {
  const name = vm.name || vm.id;
  if (verb === 'delete') {
    if (!await confirmAction('Delete VM ' + name + '? Its disk is destroyed. This cannot be undone.', 'Delete')) return null;
    const r = await api('DELETE', '/vms/' + encodeURIComponent(vm.id), undefined, { idempotent: true });
    if (r && r.operation) trackOp(r.operation, 'delete ' + name, vm.id); else say('VM ' + name + ' deleted');
    if (after) after();
    return r;
  }
  if (verb !== 'start' && !await confirmAction(verb[0].toUpperCase() + verb.slice(1) + ' VM ' + name + '?', verb[0].toUpperCase() + verb.slice(1))) return null;
  const r = await api('POST', '/vms/' + encodeURIComponent(vm.id) + '/' + verb, {}, { idempotent: true });
  if (r && r.operation) trackOp(r.operation, verb + ' ' + name, vm.id);
  if (after) after();
  return r;
}

function vmButtons(vm, onError, after) {
  if (!canOperate()) return null;
  const b = (verb, label, cls) => h('button', { type: 'button', class: 'small ' + (cls || 'secondary'), 'aria-label': label + ' ' + vm.name, onclick: () => vmAction(vm, verb, after).catch(onError) }, label);
  const running = vm.desired_state === 'running';
  return h('div', { class: 'actions' },
    running ? null : b('start', 'Start'),
    running ? b('stop', 'Stop') : null,
    running ? b('reboot', 'Reboot') : null,
    b('delete', 'Delete', 'danger'));
}

async function viewVms(main, rest, query) {
  if (rest[0] === 'new') return viewVmNew(main);
  if (rest[0]) return viewVmDetail(main, decodeURIComponent(rest[0]));
  const f = { q: query.get('q') || '', state: query.get('state') || '', node: query.get('node') || '', tenant: query.get('tenant') || '', label: query.get('label') || '', site: query.get('site') || '', cursor: query.get('cursor') || '' };
  const prevStack = (query.get('prev') || '').split(',').filter(Boolean);
  const err = h('div', {});
  const tableBox = h('div', { 'aria-live': 'polite', 'aria-busy': 'true' });
  const input = (id, label, value, attrs) => h('div', { class: 'field' }, h('label', { for: id }, label), h('input', Object.assign({ id, name: id, value }, attrs || {})));
  const select = (id, label, value, options) => h('div', { class: 'field' }, h('label', { for: id }, label),
    h('select', { id, name: id }, options.map(([v, t]) => h('option', { value: v, selected: v === value }, t))));
  let tenants = [];
  if (isAdmin()) { try { tenants = (await api('GET', '/tenants?limit=500')).items || []; } catch { tenants = []; } }
  const members = (S.cluster && S.cluster.members) || [];
  const sites = await loadSites();
  const form = h('form', { class: 'panel row filters', role: 'search', 'aria-label': 'Filter VMs', onsubmit: (ev) => {
    ev.preventDefault();
    const d = new FormData(form);
    setHashQuery('#/vms', { q: d.get('q'), state: d.get('state'), node: d.get('node'), tenant: d.get('tenant'), label: d.get('label'), site: d.get('site') });
  } },
  sites.length > 1 ? select('site', 'Site', f.site, [['', 'This site'], ['all', 'All sites'], ...sites.filter((x) => !x.local).map((x) => [x.name, x.name])]) : null,
  input('q', 'Search by name', f.q, { type: 'search', placeholder: 'name contains…' }),
  select('state', 'State', f.state, [['', 'Any state'], ...VM_STATES.map((s) => [s, s])]),
  select('node', 'Node', f.node, [['', 'Any node'], ...members.map((m) => [m.name, m.name])]),
  isAdmin() ? select('tenant', 'Tenant', f.tenant, [['', 'All tenants'], ...tenants.map((t) => [t.id, t.name])]) : null,
  input('label', 'Label', f.label, { placeholder: 'key=value', pattern: '[^=]+=.*', title: 'key=value' }),
  h('button', { type: 'submit' }, 'Apply'),
  h('button', { type: 'button', class: 'secondary', onclick: () => { location.hash = '#/vms'; } }, 'Reset'));
  main.append(h('div', { class: 'row' }, h('h1', {}, 'Virtual machines'), h('div', { class: 'spacer' }),
    canOperate() ? h('a', { class: 'button', href: '#/vms/new' }, 'New VM') : null), form, err, tableBox);
  const tenantName = (id) => { const t = tenants.find((x) => x.id === id); return t ? t.name : id; };
  let lastKey = null;

  const render = async () => {
    const q = new URLSearchParams();
    // The API filters by name, state, node, tenant and label, so every search pages the same way.
    q.set('limit', String(PAGE_SIZE));
    for (const k of ['q', 'state', 'node', 'tenant', 'label', 'site', 'cursor']) if (f[k]) q.set(k, f[k]);
    let page;
    try { page = await api('GET', '/vms?' + q.toString()); } catch (e) { clear(err).append(errorBox(e)); tableBox.setAttribute('aria-busy', 'false'); return; }
    clear(err);
    // Polling re-renders only on change, so keyboard focus inside the table survives refreshes.
    const key = JSON.stringify([page, S.ops.map((o) => o.state)]);
    if (key === lastKey) return;
    lastKey = key;
    let items = page.items || [];
    // Filter here as well, in case the node predates the name filter and ignored it.
    if (f.q) items = items.filter((v) => v.name.toLowerCase().includes(f.q.toLowerCase()));
    const onError = (e) => clear(err).append(errorBox(e));
    clear(tableBox);
    tableBox.setAttribute('aria-busy', 'false');
    if (!items.length) { tableBox.append(h('p', { class: 'panel muted' }, 'No VMs match.')); }
    else {
      tableBox.append(h('div', { class: 'table-wrap' }, h('table', { class: 'cards', id: 'vm-table' },
        h('thead', {}, h('tr', {}, ['Name', 'State', 'Site', 'Node', 'vCPUs', 'Memory', 'Tenant', 'Labels', 'Actions'].map((t, i) => h('th', { scope: 'col', class: i === 4 || i === 5 ? 'num' : null }, t)))),
        h('tbody', {}, items.map((v) => h('tr', { 'data-vm': v.id, 'data-site': v.site ? v.site.name : '' },
          h('td', { 'data-label': 'Name' }, h('a', { href: '#/vms/' + encodeURIComponent(v.id) }, v.name)),
          h('td', { 'data-label': 'State' }, badge(v.state), v.desired_state && v.desired_state !== v.state ? h('span', { class: 'muted' }, ' → ' + v.desired_state) : null),
          h('td', { 'data-label': 'Site' }, siteCell(v.site)),
          // Node ids are per site: only this site's are named.
          h('td', { 'data-label': 'Node' }, v.node === null || v.node === undefined ? '—' : (!v.site || isLocalSite(sites, v.site) ? memberName(v.node) : '#' + v.node)),
          h('td', { 'data-label': 'vCPUs', class: 'num' }, v.vcpus),
          h('td', { 'data-label': 'Memory', class: 'num' }, fmtMiB(v.memory_mib)),
          h('td', { 'data-label': 'Tenant' }, tenantName(v.tenant)),
          h('td', { 'data-label': 'Labels' }, Object.entries(v.labels || {}).map(([k, val]) => h('span', { class: 'tag' }, k + '=' + val))),
          h('td', { 'data-label': 'Actions' }, vmButtons(v, onError, refreshView))))))));
    }
    const base = { q: f.q, state: f.state, node: f.node, tenant: f.tenant, label: f.label, site: f.site };
    tableBox.append(h('nav', { class: 'pager', 'aria-label': 'Pages' },
      h('button', { type: 'button', class: 'secondary', disabled: !f.cursor, onclick: () => {
        const prev = prevStack.slice(); const back = prev.pop();
        setHashQuery('#/vms', Object.assign({}, base, { cursor: back === '-' ? '' : back, prev: prev.join(',') }));
      } }, '← Previous'),
      h('button', { type: 'button', class: 'secondary', disabled: !page.next_cursor, onclick: () => {
        setHashQuery('#/vms', Object.assign({}, base, { cursor: page.next_cursor, prev: prevStack.concat([f.cursor || '-']).join(',') }));
      } }, 'Next →'),
      h('span', { class: 'muted' }, items.length + ' shown')));
  };
  S.view.refresh = render;
  await render();
}

async function viewVmDetail(main, id) {
  const err = h('div', {});
  const body = h('div', { 'aria-live': 'polite' });
  main.append(h('p', {}, h('a', { href: '#/vms' }, '← All VMs')), err, body);
  let lastKey = null;
  const render = async () => {
    let vm;
    try { vm = await api('GET', '/vms/' + encodeURIComponent(id)); } catch (e) {
      clear(body); clear(err).append(errorBox(e));
      if (e.status === 404) body.append(h('h1', {}, 'VM not found'));
      return;
    }
    vm = vm.vm || vm;
    const key = JSON.stringify([vm, S.ops.filter((o) => o.target === vm.id)]);
    if (key === lastKey) return;
    lastKey = key;
    clear(err); clear(body);
    const dl = (pairs) => h('dl', { class: 'kv' }, pairs.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
    body.append(
      h('div', { class: 'row', id: 'vm-head' }, h('h1', {}, vm.name), badge(vm.state), h('div', { class: 'spacer' }),
        vmButtons(vm, (e) => clear(err).append(errorBox(e)), () => refreshView())),
      h('div', { class: 'panel', id: 'vm-spec' }, dl([
        ['ID', h('span', { class: 'mono' }, vm.id)],
        ['State', [badge(vm.state), ' desired ', vm.desired_state || '—']],
        ['Node', vm.node === null || vm.node === undefined ? 'not placed' : memberName(vm.node)],
        ['Epoch', vm.epoch ?? '—'],
        ['vCPUs', vm.vcpus],
        ['Memory', fmtMiB(vm.memory_mib)],
        ['Disk', vm.disk_gib ? vm.disk_gib + ' GiB' : '—'],
        ['Image', vm.image || '—'],
        ['Tenant', vm.tenant],
        ['HA', vm.ha ? 'yes' : 'no'],
        ['Anti-affinity group', vm.anti_affinity_group || '—'],
        ['Labels', Object.keys(vm.labels || {}).length ? Object.entries(vm.labels).map(([k, v]) => h('span', { class: 'tag' }, k + '=' + v)) : '—'],
        ['Created', fmtTime(vm.created_at)],
        ['Updated', fmtTime(vm.updated_at)],
      ])));
    if (canOperate() && vm.node !== null && vm.node !== undefined) body.append(migratePanel(vm, err));
    body.append(charts);
    const ops = S.ops.filter((o) => o.target === vm.id);
    body.append(h('h2', {}, 'Operations started from this browser'),
      ops.length ? h('ul', { class: 'panel' }, ops.map(opItem)) : h('p', { class: 'muted' }, 'None in this session.'));
  };
  // The charts live outside the re-rendered part, so a refresh of the VM does not redraw them
  // (and move keyboard focus); they refresh on their own clock.
  const charts = h('section', { class: 'panel', 'aria-labelledby': 'charts-title' });
  let chartsAt = 0;
  const refresh = async () => {
    await render();
    if (Date.now() - chartsAt >= METRICS_MS) { chartsAt = Date.now(); await renderCharts(charts, id); }
  };
  S.view.refresh = refresh;
  await refresh();
}

// ---------------------------------------------------------------- VM metrics charts

const METRICS_MS = 5000;

// Draws `values` (numbers or null) as a line in an SVG of fixed size; presentation attributes
// only, because the page's CSP allows no inline style.
function sparkline(values, label) {
  const NS = 'http://www.w3.org/2000/svg';
  const W = 300; const H = 60;
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
  svg.setAttribute('class', 'spark');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', label);
  const nums = values.filter((v) => typeof v === 'number' && isFinite(v));
  const max = Math.max(1e-9, ...nums);
  let d = ''; let pen = false;
  values.forEach((v, i) => {
    if (typeof v !== 'number' || !isFinite(v)) { pen = false; return; }
    const x = values.length > 1 ? (i / (values.length - 1)) * W : W / 2;
    const y = H - 2 - (v / max) * (H - 4);
    d += (pen ? 'L' : 'M') + x.toFixed(1) + ' ' + y.toFixed(1) + ' ';
    pen = true;
  });
  const path = document.createElementNS(NS, 'path');
  path.setAttribute('d', d.trim());
  path.setAttribute('fill', 'none');
  path.setAttribute('stroke', 'currentColor');
  path.setAttribute('stroke-width', '2');
  svg.append(path);
  return svg;
}

function fmtBytes(b) {
  if (typeof b !== 'number' || !isFinite(b)) return '—';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB']; let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(1) : String(Math.round(b))) + ' ' + u[i];
}

async function renderCharts(box, id) {
  let m; let unavailable = null;
  try { m = await api('GET', '/vms/' + encodeURIComponent(id) + '/metrics'); } catch (e) {
    if (e.status === 404 || e.status === 405 || e.status === 501) unavailable = 'VM statistics are not available on this cluster yet.';
    else if (e.status === 409) unavailable = 'No statistics yet: the VM is not placed on a node.';
    else unavailable = 'Statistics unavailable: ' + (e.detail || e.message);
  }
  clear(box).append(h('h2', { id: 'charts-title' }, 'CPU, memory and network'));
  if (unavailable) { box.append(h('p', { class: 'muted', role: 'status' }, unavailable)); return; }
  const samples = (m && m.samples) || [];
  if (!samples.length) { box.append(h('p', { class: 'muted', role: 'status' }, 'No samples yet.')); return; }
  const last = samples[samples.length - 1];
  const series = [
    ['CPU', samples.map((x) => x.cpu_percent ?? null), (v) => (typeof v === 'number' ? v.toFixed(1) + ' %' : '—')],
    ['Memory', samples.map((x) => x.memory_bytes ?? null), fmtBytes],
    ['Network in', samples.map((x) => x.net_rx_bytes_per_sec ?? null), (v) => fmtBytes(v) + '/s'],
    ['Network out', samples.map((x) => x.net_tx_bytes_per_sec ?? null), (v) => fmtBytes(v) + '/s'],
  ];
  const span = samples.length > 1 ? Math.round((last.at_ms - samples[0].at_ms) / 1000) : 0;
  box.append(h('div', { class: 'charts' }, series.map(([name, values, fmt]) => {
    const now = values[values.length - 1];
    const peak = Math.max(...values.filter((v) => typeof v === 'number'), 0);
    return h('figure', { class: 'chart' },
      h('figcaption', {}, h('strong', {}, name), ' ', h('span', { class: 'chart-now' }, fmt(now)), h('span', { class: 'muted' }, ' · peak ' + fmt(peak))),
      sparkline(values, name + ' over the last ' + span + ' s: now ' + fmt(now) + ', peak ' + fmt(peak)));
  })), h('p', { class: 'muted' }, samples.length + ' samples over ' + span + ' s, sampled by ' + memberName(m.node) + '.'));
}

// ---------------------------------------------------------------- migration

// A generic view of a JSON answer whose exact shape belongs to another part of the API (the
// scheduler's explanation): arrays of objects become tables, other values a list of pairs.
function jsonView(v) {
  if (Array.isArray(v)) {
    if (v.length && v.every((x) => x && typeof x === 'object' && !Array.isArray(x))) {
      const cols = [...new Set(v.flatMap((x) => Object.keys(x)))];
      return h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, cols.map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, v.map((x) => h('tr', {}, cols.map((c) => h('td', {}, scalar(x[c]))))))));
    }
    return h('span', {}, v.map(scalar).join(', ') || '—');
  }
  if (v && typeof v === 'object') {
    return h('dl', { class: 'kv' }, Object.entries(v).map(([k, x]) => [h('dt', {}, k), h('dd', {}, x && typeof x === 'object' ? jsonView(x) : scalar(x))]));
  }
  return h('span', {}, scalar(v));
}
function scalar(x) {
  if (x === null || x === undefined) return '—';
  if (typeof x === 'object') return JSON.stringify(x);
  if (typeof x === 'boolean') return x ? 'yes' : 'no';
  return String(x);
}

function migratePanel(vm, err) {
  const members = ((S.cluster && S.cluster.members) || []).filter((m) => String(m.id) !== String(vm.node) && m.role !== 'witness');
  const target = h('select', { id: 'migrate-target', name: 'target' },
    h('option', { value: '' }, 'Let the scheduler choose'), members.map((m) => h('option', { value: m.name }, m.name + (m.state && m.state !== 'up' ? ' (' + m.state + ')' : ''))));
  const why = h('div', { id: 'placement', 'aria-live': 'polite' });
  const explain = async () => {
    clear(why).append(h('p', { class: 'muted' }, 'Asking the scheduler…'));
    let p;
    try { p = await api('GET', '/vms/' + encodeURIComponent(vm.id) + '/placement'); } catch (e) {
      clear(why).append(h('p', { class: 'muted', role: 'status' }, e.status === 404 || e.status === 501
        ? 'The scheduler does not explain placements on this cluster yet.'
        : 'No explanation: ' + (e.detail || e.message)));
      return;
    }
    clear(why).append(h('h3', {}, 'Why the scheduler places it where it does'), jsonView(p));
  };
  const form = h('form', { class: 'row', 'aria-label': 'Migrate ' + vm.name, onsubmit: async (ev) => {
    ev.preventDefault();
    const to = target.value;
    const label = 'Migrate VM ' + vm.name + ' from ' + memberName(vm.node) + ' to ' + (to || 'the node the scheduler chooses') + '?';
    if (!await confirmAction(label, 'Migrate')) return;
    try {
      const r = await api('POST', '/vms/' + encodeURIComponent(vm.id) + '/migrate', to ? { target_node: to } : {}, { idempotent: true });
      if (r && r.operation) trackOp(r.operation, 'migrate ' + vm.name, vm.id);
      refreshView();
    } catch (e) {
      // A node without the route answers 404 without our `not_found` code (or 405/501).
      if ((e.status === 404 && e.code !== 'not_found') || e.status === 405 || e.status === 501) {
        clear(err).append(h('div', { class: 'alert info', role: 'status' }, 'Live migration is not available on this cluster yet.'));
      } else clear(err).append(errorBox(e));
    }
  } },
  h('div', { class: 'field' }, h('label', { for: 'migrate-target' }, 'Target node'), target),
  h('button', { type: 'submit', id: 'migrate' }, 'Migrate'),
  h('button', { type: 'button', class: 'secondary', id: 'explain', onclick: explain }, 'Explain placement'));
  return h('section', { class: 'panel', 'aria-labelledby': 'migrate-title' }, h('h2', { id: 'migrate-title' }, 'Live migration'), form, why);
}

function parseLabels(text) {
  const out = {};
  for (const part of text.split(',').map((s) => s.trim()).filter(Boolean)) {
    const i = part.indexOf('=');
    if (i <= 0) return { error: 'Each label must be key=value, separated by commas.' };
    const k = part.slice(0, i).trim(); const v = part.slice(i + 1).trim();
    if (k.length > 63 || v.length > 255) return { error: 'Label "' + k + '" is too long (key 63, value 255).' };
    out[k] = v;
  }
  return { labels: out };
}

async function viewVmNew(main) {
  let tenants = [];
  if (isAdmin()) { try { tenants = (await api('GET', '/tenants?limit=500')).items || []; } catch { tenants = []; } }
  const members = (S.cluster && S.cluster.members) || [];
  const sites = await loadSites();
  const err = h('div', {});
  const fields = {};
  const field = (id, label, control, hint) => {
    const e = h('div', { class: 'err', id: id + '-err' });
    control.id = id; control.name = id;
    control.setAttribute('aria-describedby', id + '-err' + (hint ? ' ' + id + '-hint' : ''));
    fields[id] = { control, e };
    return h('div', { class: 'field' }, h('label', { for: id }, label), control, hint ? h('div', { class: 'hint', id: id + '-hint' }, hint) : null, e);
  };
  const opt = (v, t) => h('option', { value: v }, t);
  const form = h('form', { class: 'panel', novalidate: true, 'aria-labelledby': 'new-vm-title' },
    h('div', { class: 'grid2' },
      field('name', 'Name', h('input', { required: true, autocomplete: 'off' }), 'Letters, digits, ".", "-", "_"; up to 63.'),
      isAdmin() ? field('tenant', 'Tenant', h('select', {}, opt('', 'My tenant'), tenants.map((t) => opt(t.id, t.name)))) : null,
      sites.length > 1 ? field('site', 'Site', h('select', {}, opt('', 'This site'), sites.filter((x) => !x.local).map((x) => opt(x.name, x.name + (x.health === 'ok' ? '' : ' (' + x.health + ')')))), 'Another site creates it there, over the site link; its scheduler picks the node') : null,
      field('vcpus', 'vCPUs', h('input', { type: 'number', min: 1, max: 64, value: 1, required: true }), '1 to 64'),
      field('memory', 'Memory (MiB)', h('input', { type: 'number', min: 64, max: 1048576, value: 128, step: 64, required: true }), '64 to 1048576'),
      field('disk', 'Disk (GiB)', h('input', { type: 'number', min: 0, max: 65536 }), 'Optional'),
      field('image', 'Image', h('input', { autocomplete: 'off' }), 'Optional image name'),
      field('labels', 'Labels', h('input', { placeholder: 'env=prod, team=web', autocomplete: 'off' }), 'Optional, key=value separated by commas'),
      field('node', 'Node', h('select', {}, opt('', 'Let the scheduler choose'), members.map((m) => opt(m.name, m.name)))),
      field('group', 'Anti-affinity group', h('input', { autocomplete: 'off' }), 'VMs in one group run on different nodes')),
    h('div', { class: 'field' }, h('label', { class: 'check' }, h('input', { type: 'checkbox', id: 'ha', name: 'ha' }), 'Restart elsewhere if its node fails (HA)')),
    h('div', { class: 'field' }, h('label', { class: 'check' }, h('input', { type: 'checkbox', id: 'start', name: 'start', checked: true }), 'Start after creation')),
    err,
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'create-vm' }, 'Create VM'), h('a', { class: 'button secondary', href: '#/vms' }, 'Cancel')));
  main.append(h('h1', { id: 'new-vm-title' }, 'New VM'), form);
  fields.name.control.focus();

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clear(err);
    const problems = {};
    const v = (id) => (fields[id] ? fields[id].control.value.trim() : '');
    if (!NAME_RE.test(v('name'))) problems.name = 'Enter a name of 1-63 letters, digits, ".", "-" or "_", starting with a letter or digit.';
    const vcpus = Number(v('vcpus'));
    if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > 64) problems.vcpus = 'vCPUs must be a whole number from 1 to 64.';
    const mem = Number(v('memory'));
    if (!Number.isInteger(mem) || mem < 64 || mem > 1048576) problems.memory = 'Memory must be a whole number of MiB from 64 to 1048576.';
    const disk = v('disk') === '' ? null : Number(v('disk'));
    if (disk !== null && (!Number.isInteger(disk) || disk < 0 || disk > 65536)) problems.disk = 'Disk must be a whole number of GiB up to 65536.';
    if (v('image') && !NAME_RE.test(v('image'))) problems.image = 'Image names use letters, digits, ".", "-" or "_".';
    const lab = parseLabels(v('labels'));
    if (lab.error) problems.labels = lab.error;
    for (const [id, f] of Object.entries(fields)) {
      f.e.textContent = problems[id] || '';
      if (problems[id]) f.control.setAttribute('aria-invalid', 'true'); else f.control.removeAttribute('aria-invalid');
    }
    const first = Object.keys(problems)[0];
    if (first) { fields[first].control.focus(); return; }
    const body = { name: v('name'), vcpus, memory_mib: mem, labels: lab.labels, ha: $('#ha').checked, start: $('#start').checked };
    if (disk !== null) body.disk_gib = disk;
    if (v('image')) body.image = v('image');
    if (v('tenant')) body.tenant = v('tenant');
    if (v('site')) body.site = v('site');
    const placement = {};
    // Node names are per site: a node of this site means nothing elsewhere.
    if (v('node') && !v('site')) placement.node = v('node');
    if (v('group')) placement.anti_affinity_group = v('group');
    if (Object.keys(placement).length) body.placement = placement;
    const btn = $('#create-vm');
    btn.disabled = true;
    try {
      const r = await api('POST', '/vms', body, { idempotent: true });
      const vm = r.vm || r;
      if (r.operation) trackOp(r.operation, 'create ' + vm.name, vm.id);
      location.hash = '#/vms/' + encodeURIComponent(vm.id);
    } catch (e) {
      err.append(errorBox(e));
      err.querySelector('[role="alert"]').setAttribute('tabindex', '-1');
      err.firstChild.focus();
    } finally { btn.disabled = false; }
  });
}

// ---------------------------------------------------------------- sites

// GET /sites, or just this site when the node has no federation (404) or it fails.
async function loadSites() {
  if (S.features.sites === false) return [];
  try { return (await api('GET', '/sites')).sites || []; } catch (e) {
    if (e.status === 404) { S.features.sites = false; applyFeatures(); }
    return [];
  }
}

function isLocalSite(sites, tag) {
  const local = sites.find((x) => x.local);
  return !local || local.id === tag.id;
}

function fmtAge(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms < 1000) return ms + ' ms';
  if (ms < 120000) return Math.round(ms / 1000) + ' s';
  return Math.round(ms / 60000) + ' min';
}

function siteCell(tag) {
  if (!tag) return '—';
  return h('span', {}, tag.name, tag.stale ? h('span', { class: 'badge warn', title: 'last heard from ' + fmtAge(tag.age_ms) + ' ago' }, ' stale ' + fmtAge(tag.age_ms)) : null);
}

function healthBadge(health) {
  const cls = health === 'ok' ? 'ok' : (health === 'never' ? 'muted' : 'warn');
  return h('span', { class: 'badge ' + cls }, health);
}

async function viewSites(main) {
  const err = h('div', {});
  const box = h('div', { 'aria-live': 'polite' });
  main.append(h('h1', {}, 'Sites'), h('p', { class: 'muted' }, 'Each site is its own cluster and keeps working alone; linked sites share a catalog of their nodes, VMs, tenants and users.'), err, box);
  const render = async () => {
    let list;
    try { list = await api('GET', '/sites'); } catch (e) { clear(err).append(errorBox(e)); return; }
    clear(err);
    clear(box);
    box.append(h('div', { class: 'table-wrap' }, h('table', { class: 'cards', id: 'site-table' },
      h('thead', {}, h('tr', {}, ['Site', 'Health', 'Latency', 'Last sync', 'Lag', 'Endpoints', 'Error', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, (list.sites || []).map((x) => h('tr', { 'data-site': x.name },
        h('td', { 'data-label': 'Site' }, h('strong', {}, x.name), x.local ? h('span', { class: 'muted' }, ' (this site)') : null),
        h('td', { 'data-label': 'Health' }, healthBadge(x.health)),
        h('td', { 'data-label': 'Latency' }, x.latency_ms === null || x.latency_ms === undefined ? '—' : x.latency_ms + ' ms'),
        h('td', { 'data-label': 'Last sync' }, x.local ? '—' : (x.age_ms === null || x.age_ms === undefined ? 'never' : fmtAge(x.age_ms) + ' ago')),
        h('td', { 'data-label': 'Lag' }, x.local || x.lag_entries === null || x.lag_entries === undefined ? '—' : x.lag_entries + ' entries'),
        h('td', { 'data-label': 'Endpoints' }, (x.addrs || []).join(', ') || '—'),
        h('td', { 'data-label': 'Error' }, x.error || '—'),
        h('td', { 'data-label': 'Actions' },
          h('a', { class: 'button secondary', href: '#/vms?site=' + encodeURIComponent(x.local ? '' : x.name) }, 'VMs'),
          !x.local && isAdmin() ? h('button', { type: 'button', class: 'danger', onclick: async () => {
            if (!(await confirmAction('Unlink site ' + x.name + '? Its catalog is forgotten here; nothing changes at the site itself.', 'Unlink'))) return;
            try { await api('DELETE', '/sites/' + encodeURIComponent(x.name)); render(); } catch (e) { clear(err).append(errorBox(e)); }
          } }, 'Unlink') : null)))))));
  };
  if (isAdmin()) {
    const out = h('div', { 'aria-live': 'polite' });
    const token = h('input', { id: 'link-token', name: 'link-token', autocomplete: 'off', required: true });
    const addrs = h('input', { id: 'link-addrs', name: 'link-addrs', autocomplete: 'off', placeholder: 'host:port, host:port', required: true });
    const linkErr = h('div', {});
    main.append(h('section', { class: 'panel', 'aria-labelledby': 'link-title' },
      h('h2', { id: 'link-title' }, 'Link sites'),
      h('p', { class: 'muted' }, 'Issue a one-time token here and enter it, with this site\'s endpoints, at the other site; or enter a token from the other site below.'),
      h('button', { type: 'button', id: 'issue-token', onclick: async () => {
        try {
          const t = await api('POST', '/federation/tokens');
          clear(out).append(h('p', {}, 'Token (shown once, valid for an hour): ', h('code', { id: 'issued-token' }, t.token)), h('p', {}, 'Endpoints: ', h('code', {}, (t.addrs || []).join(','))));
        } catch (e) { clear(out).append(errorBox(e)); }
      } }, 'Issue link token'), out,
      h('form', { id: 'link-form', onsubmit: async (ev) => {
        ev.preventDefault();
        clear(linkErr);
        const list = addrs.value.split(',').map((a) => a.trim()).filter(Boolean);
        try { await api('POST', '/sites', { token: token.value.trim(), addrs: list }); token.value = ''; addrs.value = ''; render(); } catch (e) { linkErr.append(errorBox(e)); }
      } },
      h('div', { class: 'grid2' },
        h('div', { class: 'field' }, h('label', { for: 'link-token' }, 'Token from the other site'), token),
        h('div', { class: 'field' }, h('label', { for: 'link-addrs' }, 'Its endpoints'), addrs)),
      linkErr,
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Link')))));
  }
  S.view.refresh = render;
  await render();
}

// ---------------------------------------------------------------- tenants

function quotaCell(t, key, usageKey, fmt) {
  const used = t.usage ? t.usage[usageKey] : undefined;
  const max = t.quota ? t.quota[key] : undefined;
  const f = fmt || ((x) => x);
  return (used === undefined ? '—' : f(used)) + ' / ' + (max === null || max === undefined ? '∞' : f(max));
}

function numOrNull(s) { const t = String(s || '').trim(); return t === '' ? null : Number(t); }

async function viewTenants(main) {
  const err = h('div', {});
  const list = h('div', { 'aria-live': 'polite' });
  main.append(h('h1', {}, 'Tenants'), err, list);
  if (!isAdmin()) { err.append(h('div', { class: 'alert info' }, 'Only administrators manage tenants.')); return; }
  const qfields = () => [
    ['max_vms', 'Max VMs'], ['max_vcpus', 'Max vCPUs'], ['max_memory_mib', 'Max memory (MiB)'], ['max_disk_gib', 'Max disk (GiB)']];
  const quotaInputs = (prefix, q) => qfields().map(([k, label]) => h('div', { class: 'field' },
    h('label', { for: prefix + k }, label), h('input', { id: prefix + k, type: 'number', min: 0, value: q && q[k] !== null && q[k] !== undefined ? q[k] : '', placeholder: 'no limit' })));
  const readQuota = (prefix) => {
    const q = {};
    for (const [k] of qfields()) {
      const n = numOrNull($('#' + prefix + k).value);
      if (n !== null && (!Number.isInteger(n) || n < 0)) throw new ApiError(400, { code: 'validation_failed', detail: 'Quotas are whole numbers (empty means no limit).' });
      q[k] = n;
    }
    return q;
  };
  const editBox = h('div', {});
  const render = async () => {
    const page = await api('GET', '/tenants?limit=500');
    clear(list);
    list.append(h('div', { class: 'table-wrap' }, h('table', { class: 'cards' },
      h('thead', {}, h('tr', {}, ['Name', 'VMs', 'vCPUs', 'Memory', 'Disk (GiB)', 'Actions'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, (page.items || []).map((t) => h('tr', {},
        h('td', { 'data-label': 'Name' }, h('strong', {}, t.name), ' ', h('span', { class: 'muted mono' }, t.id)),
        h('td', { 'data-label': 'VMs' }, quotaCell(t, 'max_vms', 'vms')),
        h('td', { 'data-label': 'vCPUs' }, quotaCell(t, 'max_vcpus', 'vcpus')),
        h('td', { 'data-label': 'Memory' }, quotaCell(t, 'max_memory_mib', 'memory_mib', fmtMiB)),
        h('td', { 'data-label': 'Disk' }, quotaCell(t, 'max_disk_gib', 'disk_gib')),
        h('td', {}, h('div', { class: 'actions' },
          h('button', { type: 'button', class: 'small secondary', 'aria-label': 'Edit quota of ' + t.name, onclick: () => editTenant(t) }, 'Edit quota'),
          h('button', { type: 'button', class: 'small danger', 'aria-label': 'Delete tenant ' + t.name, onclick: async () => {
            if (!await confirmAction('Delete tenant ' + t.name + '? It must have no VMs or users left.', 'Delete')) return;
            try { await api('DELETE', '/tenants/' + encodeURIComponent(t.id)); say('Tenant ' + t.name + ' deleted'); await render(); } catch (e) { clear(err).append(errorBox(e)); }
          } }, 'Delete')))))))));
  };
  const editTenant = (t) => {
    clear(editBox).append(h('form', { class: 'panel', 'aria-label': 'Edit quota of ' + t.name, onsubmit: async (ev) => {
      ev.preventDefault();
      try { await api('PATCH', '/tenants/' + encodeURIComponent(t.id), { quota: readQuota('e-') }); say('Quota of ' + t.name + ' saved'); clear(editBox); clear(err); await render(); } catch (e) { clear(err).append(errorBox(e)); }
    } }, h('h2', {}, 'Quota of ' + t.name), h('div', { class: 'grid2' }, quotaInputs('e-', t.quota)),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Save'), h('button', { type: 'button', class: 'secondary', onclick: () => clear(editBox) }, 'Cancel'))));
    editBox.querySelector('input').focus();
  };
  const name = h('input', { id: 't-name', required: true, autocomplete: 'off' });
  const create = h('form', { class: 'panel', 'aria-labelledby': 'new-tenant', onsubmit: async (ev) => {
    ev.preventDefault();
    clear(err);
    try {
      if (!NAME_RE.test(name.value.trim())) throw new ApiError(400, { code: 'validation_failed', detail: 'Tenant names are 1-63 letters, digits, ".", "-" or "_".' });
      await api('POST', '/tenants', { name: name.value.trim(), quota: readQuota('n-') }, { idempotent: true });
      say('Tenant ' + name.value + ' created'); create.reset(); await render();
    } catch (e) { err.append(errorBox(e)); }
  } }, h('h2', { id: 'new-tenant' }, 'New tenant'), h('div', { class: 'grid2' },
    h('div', { class: 'field' }, h('label', { for: 't-name' }, 'Name'), name), quotaInputs('n-', null)),
  h('button', { type: 'submit' }, 'Create tenant'));
  main.append(editBox, create);
  S.view.refresh = render;
  await render();
}

// ---------------------------------------------------------------- users

const ROLES = ['admin', 'tenant-admin', 'operator', 'viewer'];

async function viewUsers(main) {
  const err = h('div', {});
  const list = h('div', { 'aria-live': 'polite' });
  main.append(h('h1', {}, 'Users'), err, list);
  if (!canManageUsers()) { err.append(h('div', { class: 'alert info' }, 'Only administrators manage users.')); return; }
  let tenants = [];
  if (isAdmin()) { try { tenants = (await api('GET', '/tenants?limit=500')).items || []; } catch { tenants = []; } }
  const tname = (id) => { const t = tenants.find((x) => x.id === id); return t ? t.name : id; };
  const roles = isAdmin() ? ROLES : ROLES.filter((r) => r !== 'admin');
  const render = async () => {
    const page = await api('GET', '/users?limit=500');
    clear(list);
    list.append(h('div', { class: 'table-wrap' }, h('table', { class: 'cards' },
      h('thead', {}, h('tr', {}, ['User', 'Tenant', 'Role', 'Created', 'Actions'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, (page.items || []).map((u) => {
        const sel = h('select', { 'aria-label': 'Role of ' + u.username, onchange: async () => {
          try { await api('PATCH', '/users/' + encodeURIComponent(u.id), { role: sel.value }); say('Role of ' + u.username + ' is now ' + sel.value); clear(err); } catch (e) { clear(err).append(errorBox(e)); sel.value = u.role; }
        } }, ROLES.map((r) => h('option', { value: r, selected: r === u.role, disabled: !roles.includes(r) }, r)));
        return h('tr', {},
          h('td', { 'data-label': 'User' }, h('strong', {}, u.username)),
          h('td', { 'data-label': 'Tenant' }, tname(u.tenant)),
          h('td', { 'data-label': 'Role' }, u.id === (S.session && S.session.sub) ? u.role : sel),
          h('td', { 'data-label': 'Created' }, fmtTime(u.created_at)),
          h('td', {}, u.id === (S.session && S.session.sub) ? h('span', { class: 'muted' }, 'you') : h('button', { type: 'button', class: 'small danger', 'aria-label': 'Delete user ' + u.username, onclick: async () => {
            if (!await confirmAction('Delete user ' + u.username + '?', 'Delete')) return;
            try { await api('DELETE', '/users/' + encodeURIComponent(u.id)); say('User ' + u.username + ' deleted'); await render(); } catch (e) { clear(err).append(errorBox(e)); }
          } }, 'Delete')));
      })))));
  };
  const form = h('form', { class: 'panel', 'aria-labelledby': 'new-user', novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault(); clear(err);
    const d = new FormData(form);
    try {
      if (!NAME_RE.test(String(d.get('username')).trim())) throw new ApiError(400, { code: 'validation_failed', detail: 'User names are 1-63 letters, digits, ".", "-" or "_".' });
      if (String(d.get('password')).length < 8) throw new ApiError(400, { code: 'validation_failed', detail: 'Passwords have at least 8 characters.' });
      const body = { username: String(d.get('username')).trim(), password: d.get('password'), role: d.get('role'), tenant: d.get('tenant') || (S.session && S.session.tenant) };
      await api('POST', '/users', body, { idempotent: true });
      say('User ' + body.username + ' created'); form.reset(); await render();
    } catch (e) { err.append(errorBox(e)); }
  } }, h('h2', { id: 'new-user' }, 'New user'), h('div', { class: 'grid2' },
    h('div', { class: 'field' }, h('label', { for: 'u-name' }, 'User name'), h('input', { id: 'u-name', name: 'username', required: true, autocomplete: 'off' })),
    h('div', { class: 'field' }, h('label', { for: 'u-pass' }, 'Password'), h('input', { id: 'u-pass', name: 'password', type: 'password', required: true, autocomplete: 'new-password', minlength: 8 })),
    isAdmin() ? h('div', { class: 'field' }, h('label', { for: 'u-tenant' }, 'Tenant'), h('select', { id: 'u-tenant', name: 'tenant' }, tenants.map((t) => h('option', { value: t.id }, t.name)))) : null,
    h('div', { class: 'field' }, h('label', { for: 'u-role' }, 'Role'), h('select', { id: 'u-role', name: 'role' }, roles.map((r) => h('option', { value: r, selected: r === 'viewer' }, r))))),
  h('button', { type: 'submit' }, 'Create user'));
  main.append(form);
  S.view.refresh = render;
  await render();
}

// ---------------------------------------------------------------- audit

async function viewAudit(main, _rest, query) {
  const err = h('div', {});
  const list = h('div', { 'aria-live': 'polite' });
  const f = { actor: query.get('actor') || '', action: query.get('action') || '', result: query.get('result') || '', cursor: query.get('cursor') || '' };
  const form = h('form', { class: 'panel row filters', role: 'search', 'aria-label': 'Filter audit log', onsubmit: (ev) => {
    ev.preventDefault(); const d = new FormData(form);
    setHashQuery('#/audit', { actor: d.get('actor'), action: d.get('action'), result: d.get('result') });
  } },
  h('div', { class: 'field' }, h('label', { for: 'a-actor' }, 'Actor'), h('input', { id: 'a-actor', name: 'actor', value: f.actor })),
  h('div', { class: 'field' }, h('label', { for: 'a-action' }, 'Action'), h('input', { id: 'a-action', name: 'action', value: f.action, placeholder: 'vm.create' })),
  h('div', { class: 'field' }, h('label', { for: 'a-result' }, 'Result'), h('select', { id: 'a-result', name: 'result' }, ['', 'ok', 'failed'].map((r) => h('option', { value: r, selected: r === f.result }, r || 'Any')))),
  h('button', { type: 'submit' }, 'Apply'));
  main.append(h('h1', {}, 'Audit log'), form, err, list);
  const render = async () => {
    const q = new URLSearchParams({ limit: '100' });
    for (const k of ['actor', 'action', 'result', 'cursor']) if (f[k]) q.set(k, f[k]);
    const page = await optional('audit', () => api('GET', '/audit?' + q.toString()));
    clear(list);
    if (page === null) { list.append(h('div', { class: 'alert info', role: 'status' }, 'The audit log is not available on this cluster yet.')); return; }
    // Filter here as well, in case the node ignores a filter it does not know.
    const items = (page.items || page || []).filter((a) => (!f.actor || a.actor === f.actor) && (!f.action || String(a.action).startsWith(f.action)) && (!f.result || a.result === f.result));
    list.append(h('div', { class: 'table-wrap' }, h('table', { class: 'cards' },
      h('thead', {}, h('tr', {}, ['When', 'Actor', 'Tenant', 'Action', 'Target', 'Result'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, items.map((a) => h('tr', {},
        h('td', { 'data-label': 'When' }, fmtTime(a.at)), h('td', { 'data-label': 'Actor' }, a.actor),
        h('td', { 'data-label': 'Tenant' }, a.tenant), h('td', { 'data-label': 'Action', class: 'mono' }, a.action),
        h('td', { 'data-label': 'Target', class: 'mono' }, a.target), h('td', { 'data-label': 'Result' }, badge(a.result === 'ok' ? 'succeeded' : a.result))))))));
    if (page.next_cursor) list.append(h('nav', { class: 'pager', 'aria-label': 'Pages' }, h('button', { type: 'button', class: 'secondary', onclick: () => setHashQuery('#/audit', Object.assign({}, f, { cursor: page.next_cursor })) }, 'Older →')));
  };
  S.view.refresh = render;
  await render();
}

// ---------------------------------------------------------------- start

function boot() {
  loadOps();
  $('#logout').addEventListener('click', () => { endSession(); loginNotice = 'You are logged out.'; location.hash = '#/login'; });
  $('#menu-toggle').addEventListener('click', () => {
    const nav = $('#nav'); const open = !nav.classList.contains('open');
    nav.classList.toggle('open', open);
    $('#menu-toggle').setAttribute('aria-expanded', String(open));
  });
  window.addEventListener('hashchange', () => { route().then(() => $('#main').focus({ preventScroll: true })); });
  const s = loadSession();
  if (s) { startSession(s); onLoggedIn().then(route); } else route();
}

boot();
