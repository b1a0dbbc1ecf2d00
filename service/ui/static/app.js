// TokenCredit page: explain heatmaps, shaping weights and history, BO progress, live load.
// Plain JS against the public API (relative URLs, so a reverse-proxy prefix works); no framework, no build.
// The admin token lives in `adminToken` below and nowhere else: not in the URL, storage, cookies or the DOM.
'use strict';

// Component order of the server (tokencredit.types.Component): the mix adds them in this order, as the server does.
const COMPONENTS = ['sparse', 'attention', 'shap', 'lime', 'loo', 'prefix'];
const EXPLAINER_LABELS = { attention: 'attention (ABC)', shap: 'SHAP', lime: 'LIME', loo: 'leave-one-out', prefix: 'prefix scores' };

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('data-')) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
};
const SVG_NS = 'http://www.w3.org/2000/svg';
const svgEl = (tag, attrs = {}) => {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
};

let adminToken = null;   // the only place the token is kept
let apiToken = null;     // the data-plane token (TOKENCREDIT_API_TOKEN), when the server asks for one; kept the same way
let config = { admin_enabled: false, mode: 'embedded' };
let info = null;

// ------------------------------------------------------------------------------------------------ HTTP
async function api(path, { method = 'GET', body, headers = {}, token = null } = {}) {
  const h = { ...headers };
  if (body !== undefined) h['content-type'] = 'application/json';
  // The data plane (v1/...) gets the API token when the server asks for one; admin calls pass their own.
  const bearer = token || (path.startsWith('v1/') ? apiToken : null);
  if (bearer) h.authorization = 'Bearer ' + bearer;
  let res;
  try {
    res = await fetch(path, {
      method, headers: h, body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store', credentials: 'omit',
    });
  } catch (exc) {
    return { ok: false, status: 0, data: null, headers: new Headers(), error: 'the server did not answer (' + exc.message + ')' };
  }
  const text = await res.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON: keep the text (e.g. /metrics) */ }
  return { ok: res.ok, status: res.status, data, headers: res.headers };
}

function errorText(r) {
  if (r.error) return r.error;
  const e = r.data && r.data.error;
  return e ? `${r.status} ${e.code}: ${e.message}` : `HTTP ${r.status}`;
}

// ------------------------------------------------------------------------------------------------ numbers
// Exact sum of floats (Shewchuk), as Python's math.fsum: the server's mix puts score − fsum(r) on the last token,
// and the page must reproduce it to the last bit.
function fsum(values) {
  const partials = [];
  for (let x of values) {
    let i = 0;
    for (let y of partials) {
      if (Math.abs(x) < Math.abs(y)) { const t = x; x = y; y = t; }
      const hi = x + y;
      const lo = y - (hi - x);
      if (lo) partials[i++] = lo;
      x = hi;
    }
    partials.length = i;
    partials.push(x);
  }
  // Round the partials' sum correctly (the tail of CPython's msum).
  let n = partials.length;
  if (!n) return 0;
  let hi = partials[--n];
  let lo = 0;
  while (n > 0) {
    const x = hi;
    const y = partials[--n];
    hi = x + y;
    const yr = hi - x;
    lo = y - yr;
    if (lo) break;
  }
  if (n > 0 && ((lo < 0 && partials[n - 1] < 0) || (lo > 0 && partials[n - 1] > 0))) {
    const y = lo * 2;
    const x = hi + y;
    const yr = x - hi;
    if (y === yr) hi = x;
  }
  return hi;
}

// r = Σ_k w_k r_k with w renormalised over the positive weights, the float residual on the last token:
// workers/shaping.py mix_rewards, operation for operation.
function mixRewards(score, components, weights) {
  const active = COMPONENTS.filter((c) => (weights[c] || 0) > 0);
  if (!active.length) throw new Error('at least one weight must be positive');
  const n = components[active[0]].length;
  const total = active.reduce((s, c) => s + weights[c], 0);
  const mixed = new Array(n).fill(0);
  for (const c of active) {
    const r = components[c];
    const w = weights[c] / total;
    for (let i = 0; i < n; i++) mixed[i] += w * r[i];
  }
  mixed[n - 1] += score - fsum(mixed);
  return mixed;
}

const fmt = (x, digits = 4) => (x > 0 ? '+' : x < 0 ? '−' : ' ') + Math.abs(x).toFixed(digits);

// Diverging scale: red below zero, blue above, exactly white at zero (ColorBrewer RdBu ends).
function rewardColor(value, scale) {
  const t = scale > 0 ? Math.max(-1, Math.min(1, value / scale)) : 0;
  const end = t < 0 ? [178, 24, 43] : [33, 102, 172];
  // Exactly white only at zero: a value too small to show on this scale still gets a faint tint of its sign.
  const a = value === 0 ? 0 : Math.max(Math.abs(t), 0.025);
  const rgb = end.map((c) => Math.round(255 + (c - 255) * a));
  return { background: `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`, dark: a > 0.55 };
}

// ------------------------------------------------------------------------------------------------ simplex sliders
// One range per component; moving one rescales the others in proportion so the weights stay on the simplex.
class Simplex {
  constructor(container, onChange) {
    this.container = container;
    this.onChange = onChange;
    this.names = [];
    this.weights = {};
  }

  set(names, weights) {
    this.names = names.slice();
    const w = {};
    for (const c of names) w[c] = Math.max(0, Number(weights[c]) || 0);
    const total = names.reduce((s, c) => s + w[c], 0);
    for (const c of names) w[c] = total > 0 ? w[c] / total : 1 / names.length;
    this.weights = w;
    this.render();
  }

  render() {
    this.container.replaceChildren();
    for (const c of this.names) {
      const range = el('input', { type: 'range', min: 0, max: 1, step: 0.001, 'data-component': c });
      range.value = String(this.weights[c]);
      range.disabled = this.names.length < 2;
      range.setAttribute('aria-label', `weight of ${c}`);
      range.addEventListener('input', () => this.move(c, Number(range.value)));
      const out = el('output', { 'data-weight': c });
      this.container.append(el('div', { class: 'w-row' }, el('span', { text: c }), range, out));
    }
    this.show();
  }

  move(name, value) {
    const v = Math.max(0, Math.min(1, value));
    const others = this.names.filter((c) => c !== name);
    const rest = 1 - v;
    const sumOthers = others.reduce((s, c) => s + this.weights[c], 0);
    for (const c of others) this.weights[c] = sumOthers > 1e-12 ? this.weights[c] * rest / sumOthers : rest / others.length;
    this.weights[name] = others.length ? v : 1;
    this.show(name);
    if (this.onChange) this.onChange(this.get());
  }

  show(except = null) {
    for (const c of this.names) {
      const range = this.container.querySelector(`input[data-component="${c}"]`);
      if (c !== except) range.value = String(this.weights[c]);
      const out = this.container.querySelector(`output[data-weight="${c}"]`);
      out.textContent = this.weights[c].toFixed(3);
      out.setAttribute('data-value', String(this.weights[c]));
    }
  }

  get() {
    const total = this.names.reduce((s, c) => s + this.weights[c], 0);
    const w = {};
    for (const c of this.names) w[c] = this.weights[c] / total;
    return w;
  }
}

// ------------------------------------------------------------------------------------------------ tabs
const TABS = ['explain', 'shaping', 'bo', 'live'];
let currentTab = null;

function parseHash() {
  const raw = location.hash.replace(/^#/, '');
  const [path, query = ''] = raw.split('?');
  const [tab, arg] = path.split('/');
  return { tab: TABS.includes(tab) ? tab : 'explain', arg: arg ? decodeURIComponent(arg) : null, params: new URLSearchParams(query) };
}

function route() {
  const { tab, arg, params } = parseHash();
  if (tab !== currentTab) {
    for (const t of TABS) $(`#tab-${t}`).hidden = t !== tab;
    for (const a of document.querySelectorAll('#tabs a')) a.classList.toggle('active', a.dataset.tab === tab);
    if (currentTab === 'bo') bo.stop();
    if (currentTab === 'live') live.stop();
    currentTab = tab;
  }
  if (tab === 'explain') explain.fromPermalink(params);
  if (tab === 'shaping') shaping.show();
  if (tab === 'bo') bo.show(arg);
  if (tab === 'live') live.start();
}

// ------------------------------------------------------------------------------------------------ Explain
// The messages textarea → {messages} to send, or {error} (and nothing is sent). Only what the page needs is checked
// here (JSON, a list of objects); the server validates the conversation itself and its 422 says what is wrong.
function parseMessages(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch (exc) {
    return { error: `messages: not valid JSON (${exc.message}); nothing was sent` };
  }
  if (!Array.isArray(value) || !value.length) {
    return { error: 'messages: expected a non-empty JSON list of {"role", "content"} messages; nothing was sent' };
  }
  const bad = value.findIndex((m) => !m || typeof m !== 'object' || Array.isArray(m));
  if (bad >= 0) return { error: `messages[${bad}]: expected a JSON object with "role" and "content"; nothing was sent` };
  return { messages: value };
}

// A message's text as the server derives the response from it: the string, or the text blocks concatenated.
function messageText(message) {
  const c = message.content;
  if (typeof c === 'string') return c;
  return Array.isArray(c) ? c.map((b) => (b && typeof b.text === 'string' ? b.text : '')).join('') : '';
}

const explain = {
  mixSliders: null,
  result: null,        // {item, response, placement, components: [...]} of the last answer
  lastQuery: null,     // the permalink query last applied or run, so our own hash updates do not re-run

  setup() {
    const box = $('#explainers');
    for (const c of info.components) {
      if (c === 'sparse') continue;
      const cb = el('input', { type: 'checkbox', checked: true, 'data-explainer': c });
      cb.addEventListener('change', () => this.explainersChanged());
      box.append(el('label', {}, cb, ' ' + (EXPLAINER_LABELS[c] || c)));
    }
    this.mixSliders = new Simplex($('#mix-weights'), () => this.weightsChanged());
    this.mixSliders.set(this.components(), info.shaping.weights);
    $('#explain-run').addEventListener('click', () => this.run());
    $('#own-scale').addEventListener('change', () => this.render());
    for (const id of ['prompt', 'response', 'messages', 'placement']) $('#' + id).addEventListener('input', () => this.updatePermalink());
    for (const radio of document.querySelectorAll('input[name=input-mode]')) {
      radio.addEventListener('change', () => { this.setMode(radio.value); this.updatePermalink(); });
    }
    this.updatePermalink();
    const heat = $('#heatmap');
    heat.addEventListener('mouseover', (ev) => this.hover(ev));
    heat.addEventListener('mousemove', (ev) => placeTip(ev));
    heat.addEventListener('mouseout', (ev) => { if (ev.target.classList.contains('tok')) $('#tip').hidden = true; });
  },

  // 'text': prompt and response; 'chat': a conversation whose last (assistant) message is the response.
  mode() {
    return $('input[name=input-mode]:checked').value;
  },

  setMode(mode) {
    const chat = mode === 'chat';
    $(`input[name=input-mode][value=${chat ? 'chat' : 'text'}]`).checked = true;
    $('#text-inputs').hidden = chat;
    $('#chat-inputs').hidden = !chat;
  },

  checkedExplainers() {
    return [...document.querySelectorAll('#explainers input[data-explainer]')].filter((x) => x.checked).map((x) => x.dataset.explainer);
  },

  components() {
    return COMPONENTS.filter((c) => c === 'sparse' || this.checkedExplainers().includes(c));
  },

  explainersChanged() {
    this.mixSliders.set(this.components(), this.mixSliders.get());
    if (this.result) {
      // The answer on screen was computed for the old set; a remix could not include the new ones.
      this.result = null;
      $('#heatmap').replaceChildren();
      $('#legend').hidden = true;
      setStatus('#explain-status', 'explainers changed: press Explain');
    }
    this.updatePermalink();
  },

  weightsChanged() {
    this.updatePermalink();
    if (this.result) this.render();
  },

  query() {
    const q = new URLSearchParams();
    if (this.mode() === 'chat') {
      q.set('m', $('#messages').value);  // as typed, so the link gives back the same text
    } else {
      q.set('p', $('#prompt').value);
      q.set('r', $('#response').value);
    }
    q.set('c', this.checkedExplainers().join(','));
    const w = this.mixSliders.get();
    q.set('w', Object.entries(w).map(([c, v]) => `${c}:${+v.toFixed(4)}`).join(','));
    q.set('u', $('#placement').value);
    return q.toString();
  },

  updatePermalink() {
    $('#permalink').href = '#explain?' + this.query();
  },

  fromPermalink(params) {
    if (!params.has('r') && !params.has('m')) return;
    const q = params.toString();
    if (q === this.lastQuery) return;
    this.lastQuery = q;
    if (params.has('m')) {
      this.setMode('chat');
      $('#messages').value = params.get('m');
    } else {
      this.setMode('text');
      $('#prompt').value = params.get('p') || '';
      $('#response').value = params.get('r') || '';
    }
    if (params.has('u')) $('#placement').value = params.get('u') === 'uniform' ? 'uniform' : 'last';
    if (params.has('c')) {
      const wanted = params.get('c').split(',');
      for (const cb of document.querySelectorAll('#explainers input[data-explainer]')) cb.checked = wanted.includes(cb.dataset.explainer);
    }
    const w = {};
    for (const part of (params.get('w') || '').split(',')) {
      const [c, v] = part.split(':');
      if (c) w[c] = Number(v);
    }
    this.mixSliders.set(this.components(), Object.keys(w).length ? w : info.shaping.weights);
    this.run();
  },

  async run() {
    const chat = this.mode() === 'chat';
    const placement = $('#placement').value;
    const explainers = this.checkedExplainers();
    const weights = this.mixSliders.get();
    this.lastQuery = this.query();
    history.replaceState(null, '', '#explain?' + this.lastQuery);
    this.updatePermalink();
    let input;
    if (chat) {
      const parsed = parseMessages($('#messages').value);
      if (parsed.error) { setStatus('#explain-status', parsed.error, true); return; }
      input = { messages: parsed.messages };
    } else {
      input = { prompt: $('#prompt').value, response: $('#response').value };
    }
    const body = {
      items: [input],
      weights,
      // Named here, every explainer is computed even at weight 0, so the sliders can remix without new RM rows.
      methods: Object.fromEntries(explainers.map((c) => [c, {}])),
      return_components: true,
      return_attributions: true,
      residual_placement: placement,
    };
    const button = $('#explain-run');
    button.disabled = true;
    setStatus('#explain-status', 'explaining…');
    const started = performance.now();
    const r = await api('v1/dense_rewards', { method: 'POST', body });
    button.disabled = false;
    if (!r.ok) { setStatus('#explain-status', errorText(r), true); return; }
    const item = r.data.results[0];
    if (item.error) { setStatus('#explain-status', `${item.error.code}: ${item.error.message}`, true); return; }
    // With messages the response is the last message's text (the server accepted them, so it is an assistant's):
    // the spans index it.
    const last = chat ? input.messages.length - 1 : -1;
    const response = chat ? messageText(input.messages[last]) : input.response;
    this.result = { item, response, placement, requested: weights, components: Object.keys(item.components) };
    const u = r.data.usage;
    setStatus('#explain-status',
      `score ${fmt(item.score)} · ${item.token_rewards.length} tokens · ${u.rm_rows} RM rows · ${u.latency_ms.toFixed(0)} ms server, ` +
      `${(performance.now() - started).toFixed(0)} ms here` + (item.shap_estimator ? ` · shap ${item.shap_estimator}` : '') +
      (item.prompt_truncated ? (chat ? ' · earlier messages cut to fit' : ' · prompt cut to fit') : '') +
      (chat ? ` · response: messages[${last}]` : ''));
    $('#explain-status').setAttribute('data-score', String(item.score));
    this.render();
  },

  // Rows of the heatmap: the mix first, then each component. Values: rewards; attributions and bases for hover.
  rows() {
    const { item, placement } = this.result;
    const n = item.token_rewards.length;
    const weights = this.mixSliders.get();
    const unchanged = COMPONENTS.every((c) => (weights[c] || 0) === (this.result.requested[c] || 0));
    // The server's own mix while the sliders are where the request put them; the page's remix once they move.
    const mix = unchanged ? item.token_rewards : mixRewards(item.score, item.components, weights);
    const attribution = (c) => {
      if (c === 'sparse') return { values: new Array(n).fill(0), base: item.score };
      return item.attributions[c];
    };
    const active = COMPONENTS.filter((c) => (weights[c] || 0) > 0);
    const total = active.reduce((s, c) => s + weights[c], 0);
    const mixAttr = new Array(n).fill(0);
    let mixBase = 0;
    for (const c of active) {
      const a = attribution(c);
      for (let i = 0; i < n; i++) mixAttr[i] += weights[c] / total * a.values[i];
      mixBase += weights[c] / total * a.base;
    }
    const rows = [{ name: 'mix', rewards: mix, values: mixAttr, base: mixBase, source: unchanged ? 'server' : 'page',
      label: 'mix', note: active.map((c) => `${c} ${(weights[c] / total).toFixed(3)}`).join(' + ') }];
    for (const c of COMPONENTS) {
      if (!(c in item.components)) continue;
      const a = attribution(c);
      rows.push({ name: c, rewards: item.components[c], values: a.values, base: a.base, source: 'server', label: c,
        note: c === 'sparse' ? 'score on the last token' : `base ${fmt(a.base, 3)}` });
    }
    return { rows, placement, n };
  },

  render() {
    const { item, response } = this.result;
    const { rows, placement, n } = this.rows();
    const own = $('#own-scale').checked;
    // With the base on the last token, that token's reward is mostly what the tokens do not explain; scaling by it
    // would wash out every attribution, so the scale comes from the other tokens and the last one is clamped.
    const scaled = (r) => (placement === 'last' && n > 1 ? r.slice(0, n - 1) : r);
    const maxAbs = (r) => Math.max(...r.map(Math.abs));
    const rowMax = (r) => maxAbs(scaled(r)) || maxAbs(r);
    const shared = Math.max(...rows.map((r) => maxAbs(scaled(r.rewards)))) || Math.max(...rows.map((r) => maxAbs(r.rewards)));
    const heat = $('#heatmap');
    heat.replaceChildren();
    for (const row of rows) {
      const scale = own ? rowMax(row.rewards) : shared;
      const text = el('div', { class: 'hm-text' });
      let at = 0;
      item.spans.forEach(([start, end], i) => {
        if (start > at) text.append(response.slice(at, start));
        const v = row.rewards[i];
        const color = rewardColor(v, scale);
        const tok = el('span', {
          class: 'tok' + (i === n - 1 ? ' placement' : ''), text: response.slice(start, end),
          'data-i': String(i), 'data-reward': String(v), 'data-attribution': String(row.values[i]),
          'data-base': String(row.base),
        });
        tok.style.backgroundColor = color.background;
        if (color.dark) tok.style.color = '#fff';
        text.append(tok);
        at = Math.max(at, end);
      });
      if (at < response.length) text.append(response.slice(at));
      const sum = fsum(row.rewards);
      const label = el('div', { class: 'hm-label' }, row.label, el('small', { text: row.note }),
        el('small', { text: `Σ ${fmt(sum)}` + (own ? ` · ±${scale.toFixed(3)}` : '') }));
      heat.append(el('div', { class: 'hm-row', 'data-row': row.name, 'data-source': row.source, 'data-scale': String(scale) }, label, text));
    }
    $('#legend').hidden = false;
    $('#legend-min').textContent = own ? 'each row ±its max' : fmt(-shared, 3);
    $('#legend-max').textContent = own ? '' : fmt(shared, 3);
    $('#legend-note').textContent = placement === 'last'
      ? 'The underlined last token also carries the base and may lie beyond the scale (its colour is then the end colour).'
      : '';
  },

  hover(ev) {
    const tok = ev.target;
    if (!tok.classList || !tok.classList.contains('tok')) return;
    const row = tok.closest('.hm-row').dataset.row;
    const i = Number(tok.dataset.i);
    const base = Number(tok.dataset.base);
    const sparseShare = row === 'mix' && (this.mixSliders.get().sparse || 0) > 0;
    const where = row === 'sparse' ? 'the score, always on the last token'
      : this.result.placement !== 'uniform' ? 'on the last token'
        : sparseShare ? "spread evenly; sparse's share on the last token" : 'spread evenly over the tokens';
    const attrName = row === 'mix' ? 'attribution (Σ w·v)' : row === 'sparse' ? 'attribution (none)' : 'attribution';
    const lines = [
      `${row} · token ${i} ${JSON.stringify(tok.textContent)}`,
      `reward       ${fmt(Number(tok.dataset.reward), 5)}`,
      `${attrName.padEnd(12)} ${fmt(Number(tok.dataset.attribution), 5)}`,
      `base         ${fmt(base, 5)}  (${where})`,
    ];
    const tip = $('#tip');
    tip.textContent = lines.join('\n');
    tip.hidden = false;
    placeTip(ev);
  },
};

function placeTip(ev) {
  const tip = $('#tip');
  if (tip.hidden) return;
  const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  tip.style.left = x + 'px';
  tip.style.top = (ev.clientY + 16) + 'px';
}

function setStatus(sel, text, isError = false) {
  const node = $(sel);
  node.textContent = text;
  node.classList.toggle('error', isError);
}

// ------------------------------------------------------------------------------------------------ Shaping
function weightBars(weights, names = null) {
  const box = el('div', { class: 'weights-bars' });
  for (const c of names || COMPONENTS) {
    const w = weights[c] || 0;
    if (!names && w === 0) continue;
    const bar = el('span', { class: 'bar' });
    bar.style.width = (100 * w).toFixed(1) + '%';
    box.append(el('div', { class: 'wb', 'data-component': c, 'data-value': String(w) },
      el('span', { text: c }), el('span', {}, bar), el('span', { class: 'val', text: w.toFixed(3) })));
  }
  return box;
}

// Weights that print as 0.000 are left out: they are the numerical dust of the optimiser, not a choice.
const weightsText = (w) => COMPONENTS.filter((c) => w[c] >= 5e-4).map((c) => `${c} ${(+w[c]).toFixed(3)}`).join(', ');

const shaping = {
  sliders: null,
  etag: null,

  setup() {
    $('#admin-disabled').hidden = config.admin_enabled;
    $('#admin-panel').hidden = !config.admin_enabled;
    this.sliders = new Simplex($('#new-weights'));
    $('#token-use').addEventListener('click', () => this.useToken());
    $('#admin-token').addEventListener('keydown', (ev) => { if (ev.key === 'Enter') this.useToken(); });
    $('#token-forget').addEventListener('click', () => this.forget());
    $('#shaping-save').addEventListener('click', () => this.save());
  },

  async show() {
    const r = await api('v1/info');
    if (!r.ok) { $('#shaping-current').replaceChildren(el('div', { class: 'error', text: errorText(r) })); return; }
    info = r.data;
    const s = info.shaping;
    $('#shaping-current').replaceChildren(
      el('div', { id: 'current-version', 'data-version': String(s.version), text: `version ${s.version}` + (s.deployment ? ` of ${s.deployment}` : '') }),
      weightBars(s.weights));
    if (adminToken) await this.loadHistory();
  },

  async useToken() {
    const input = $('#admin-token');
    const token = input.value.trim();
    input.value = '';   // out of the DOM at once: the variable below is the only copy
    if (!token) { setStatus('#admin-status', 'type the admin token first', true); return; }
    adminToken = token;
    await this.loadHistory();
  },

  forget() {
    adminToken = null;
    this.etag = null;
    $('#token-form').hidden = false;
    $('#token-held').hidden = true;
    $('#shaping-editor').hidden = true;
    $('#shaping-history').hidden = true;
    setStatus('#admin-status', 'token forgotten');
  },

  async loadHistory() {
    const cur = await api('admin/v1/shaping', { token: adminToken });
    if (!cur.ok) {
      const msg = cur.status === 401 ? 'the server refused this token (401): it was not kept' : errorText(cur);
      this.forget();
      setStatus('#admin-status', msg, true);
      return;
    }
    this.etag = cur.headers.get('etag');
    const h = await api('admin/v1/shaping/history', { token: adminToken });
    if (!h.ok) { setStatus('#admin-status', errorText(h), true); return; }
    $('#token-form').hidden = true;
    $('#token-held').hidden = false;
    setStatus('#admin-status', `current version ${cur.data.version} (ETag ${this.etag})`);
    const tbody = $('#shaping-history tbody');
    tbody.replaceChildren();
    for (const v of h.data.versions.slice().reverse()) {
      const tr = el('tr', { 'data-version': String(v.version), class: v.version === cur.data.version ? 'current' : '' },
        el('td', { class: 'num', text: String(v.version) }), el('td', { text: weightsText(v.weights) }),
        el('td', { text: v.updated_at }), el('td', { text: v.updated_by || '' }));
      tbody.append(tr);
    }
    $('#shaping-history').hidden = false;
    $('#shaping-editor').hidden = false;
    const names = (info ? info.components : COMPONENTS).filter((c) => COMPONENTS.includes(c));
    this.sliders.set(names, cur.data.weights);
  },

  async save() {
    if (!adminToken) return;
    const weights = this.sliders.get();
    const body = { weights, updated_by: $('#updated-by').value.trim() || null };
    // If-Match = the version this page showed: a change made meanwhile by someone else is a 412, not overwritten.
    const r = await api('admin/v1/shaping', { method: 'PUT', body, token: adminToken, headers: { 'if-match': this.etag || '*' } });
    if (r.status === 412) {
      await this.show();  // the version that won, in the history and the sliders
      setStatus('#admin-status', 'someone else saved a version since this page read it; reloaded, check and save again', true);
      return;
    }
    if (!r.ok) { setStatus('#admin-status', errorText(r), true); return; }
    await this.show();
    setStatus('#admin-status', `saved as version ${r.data.version}`);
  },
};

// ------------------------------------------------------------------------------------------------ BO
const bo = {
  timer: null,
  ticker: null,
  selected: null,
  study: null,
  fetchedAt: 0,

  show(name) {
    this.selected = name || this.selected;
    this.stop();
    this.refresh();
    this.timer = setInterval(() => this.refresh(), 3000);
    this.ticker = setInterval(() => this.renderRunning(), 1000);
  },

  stop() {
    clearInterval(this.timer);
    clearInterval(this.ticker);
    this.timer = this.ticker = null;
  },

  async refresh() {
    const list = await api('v1/bo/studies');
    if (!list.ok) { $('#bo-studies').replaceChildren(el('div', { class: 'error', text: errorText(list) })); return; }
    const studies = list.data.studies;
    $('#bo-empty').hidden = studies.length > 0;
    const box = $('#bo-studies');
    box.replaceChildren();
    if (!studies.length) { $('#bo-study').hidden = true; return; }
    if (!this.selected || !studies.some((s) => s.name === this.selected)) this.selected = studies[0].name;
    for (const s of studies) {
      const b = el('button', { type: 'button', class: 'secondary' + (s.name === this.selected ? ' active' : ''),
        text: `${s.name} · ${s.finished}/${s.target_trials} · ${s.state}`, 'data-study': s.name });
      b.addEventListener('click', () => { location.hash = '#bo/' + encodeURIComponent(s.name); });
      box.append(b);
    }
    const r = await api('v1/bo/studies/' + encodeURIComponent(this.selected));
    if (!r.ok) return;
    this.study = r.data;
    this.fetchedAt = performance.now();
    this.render();
  },

  bestTrial() {
    const s = this.study;
    const done = s.trials.filter((t) => t.status === 'complete');
    if (s.best_trial !== null && s.best_trial !== undefined) {
      const t = s.trials.find((x) => x.id === s.best_trial);
      if (t) return { trial: t, how: s.best_how || "the controller's choice" };
    }
    if (!done.length) return null;
    const better = (a, b) => (s.direction === 'maximize' ? a > b : a < b);
    return { trial: done.reduce((b, t) => (better(t.value, b.value) ? t : b)), how: 'best observed value' };
  },

  render() {
    const s = this.study;
    $('#bo-study').hidden = false;
    const finished = s.trials.filter((t) => t.status !== 'pending').length;
    const failed = s.trials.filter((t) => t.status === 'failed').length;
    $('#bo-title').textContent = `${s.name}: ${s.state}`;
    $('#bo-bar').style.width = Math.min(100, 100 * finished / s.target_trials).toFixed(1) + '%';
    const best = this.bestTrial();
    const summary = $('#bo-summary');
    summary.textContent = `${finished}/${s.target_trials} trials finished (${failed} failed) · ${s.direction} · ` +
      `components ${s.components.join(', ')} · ` +
      (best ? `best ${best.trial.value.toPrecision(6)} (trial ${best.trial.id})` : 'no result yet');
    summary.setAttribute('data-finished', String(finished));
    summary.setAttribute('data-best-trial', best ? String(best.trial.id) : '');
    summary.setAttribute('data-best-value', best ? String(best.trial.value) : '');
    $('#bo-best-title').textContent = best ? `Best weights (trial ${best.trial.id}: ${best.how})` : 'Best weights (none yet)';
    $('#bo-best').replaceChildren(best ? weightBars(best.trial.weights, s.components) : '');
    this.chart(best);
    this.renderRunning();
    const tbody = $('#bo-trials tbody');
    tbody.replaceChildren();
    for (const t of s.trials.slice().reverse()) {
      const value = t.value === null || t.value === undefined ? '' : t.value.toPrecision(6) + (t.noise ? ` ± ${t.noise.toPrecision(2)}` : '');
      const status = t.running_for_s !== null && t.running_for_s !== undefined ? 'running' : t.status;
      tbody.append(el('tr', { 'data-trial': String(t.id), class: best && best.trial.id === t.id ? 'current' : '' },
        el('td', { class: 'num', text: String(t.id) }), el('td', { text: status }), el('td', { text: t.source }),
        el('td', { class: 'num', text: t.shaping_version === null ? '' : 'v' + t.shaping_version }),
        el('td', { class: 'num', text: value }), el('td', { text: weightsText(t.weights) }),
        el('td', { text: t.note || (t.log ? 'log: ' + t.log : '') })));
    }
  },

  renderRunning() {
    const s = this.study;
    if (!s || currentTab !== 'bo') return;
    const since = s.age_s + (performance.now() - this.fetchedAt) / 1000;
    const running = s.trials.filter((t) => t.running_for_s !== null && t.running_for_s !== undefined);
    const box = $('#bo-running');
    box.replaceChildren();
    const stale = s.state === 'running' && since > 180;
    for (const t of running) {
      box.append(el('div', { class: 'running', 'data-trial': String(t.id),
        text: `trial ${t.id} running for ${duration(t.running_for_s + (s.state === 'running' ? since : 0))} (v${t.shaping_version ?? '?'})` +
          (t.log ? ` · log ${t.log}` : '') }));
    }
    box.append(el('div', { class: stale ? 'error' : 'muted',
      text: `last report ${duration(since)} ago` + (stale ? ': the controller may have stopped' : '') }));
  },

  // Objective by trial (squares: Sobol, circles: BO, crosses: failed), the best so far as a step line.
  chart(best) {
    const s = this.study;
    const svg = $('#bo-chart');
    svg.replaceChildren();
    const W = 640, H = 280, L = 56, R = 12, T = 12, B = 34;
    const done = s.trials.filter((t) => t.status === 'complete');
    const xmax = Math.max(s.target_trials - 1, s.trials.length - 1, 1);
    const lows = done.map((t) => t.value - (t.noise || 0)), highs = done.map((t) => t.value + (t.noise || 0));
    let lo = lows.length ? Math.min(...lows) : 0, hi = highs.length ? Math.max(...highs) : 1;
    if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
    const pad = (hi - lo) * 0.08;
    lo -= pad; hi += pad;
    const x = (i) => L + (W - L - R) * (i / xmax);
    const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
    svg.append(svgEl('line', { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: '#999' }));
    svg.append(svgEl('line', { x1: L, y1: T, x2: L, y2: H - B, stroke: '#999' }));
    for (let k = 0; k <= 4; k++) {
      const v = lo + (hi - lo) * k / 4;
      const t = svgEl('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' });
      t.textContent = v.toPrecision(3);
      svg.append(t);
    }
    const step = Math.max(1, Math.ceil(xmax / 10));
    for (let i = 0; i <= xmax; i += step) {
      const t = svgEl('text', { x: x(i), y: H - B + 14, 'text-anchor': 'middle' });
      t.textContent = String(i);
      svg.append(t);
    }
    const label = svgEl('text', { x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle' });
    label.textContent = `trial  (objective: ${s.direction})`;
    svg.append(label);
    // Best so far, in trial order (as the controller's study file counts it).
    const better = (a, b) => (s.direction === 'maximize' ? a > b : a < b);
    let cur = null;
    let d = '';
    const bestSoFar = [];
    for (const t of s.trials) {
      if (t.status === 'complete' && (cur === null || better(t.value, cur))) {
        d += cur === null ? `M${x(t.id)},${y(t.value)}` : `H${x(t.id)}V${y(t.value)}`;
        cur = t.value;
      }
      bestSoFar.push(cur);
    }
    if (cur !== null) d += `H${x(s.trials.length - 1)}`;
    if (d) svg.append(svgEl('path', { d, fill: 'none', stroke: '#222', 'stroke-width': 1.5, class: 'best-so-far',
      'data-values': JSON.stringify(bestSoFar) }));
    for (const t of s.trials) {
      let node;
      if (t.status === 'complete' && t.noise) {  // ± one standard deviation, as the objective reported it
        svg.append(svgEl('line', { x1: x(t.id), x2: x(t.id), y1: y(t.value - t.noise), y2: y(t.value + t.noise),
          stroke: '#2166ac', 'stroke-width': 1, class: 'noise' }));
      }
      if (t.status === 'complete') {
        const attrs = { class: 'pt', 'data-trial': String(t.id), 'data-value': String(t.value),
          fill: best && best.trial.id === t.id ? '#4d9221' : t.source === 'bo' ? '#2166ac' : '#92c5de', stroke: '#2166ac' };
        node = t.source === 'bo'
          ? svgEl('circle', { ...attrs, cx: x(t.id), cy: y(t.value), r: 5 })
          : svgEl('rect', { ...attrs, x: x(t.id) - 4.5, y: y(t.value) - 4.5, width: 9, height: 9 });
      } else if (t.status === 'failed') {
        const cx = x(t.id), cy = H - B - 8;
        node = svgEl('path', { d: `M${cx - 4},${cy - 4}L${cx + 4},${cy + 4}M${cx - 4},${cy + 4}L${cx + 4},${cy - 4}`,
          stroke: '#b2182b', 'stroke-width': 2, class: 'failed', 'data-trial': String(t.id) });
      } else continue;
      const title = svgEl('title');
      title.textContent = `trial ${t.id} (${t.source}) ` + (t.status === 'failed' ? `failed: ${t.note || ''}` : t.value.toPrecision(6));
      node.append(title);
      svg.append(node);
    }
  },
};

function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, '0')}m` : m ? `${m}m${String(r).padStart(2, '0')}s` : `${r}s`;
}

// ------------------------------------------------------------------------------------------------ Live
// Prometheus text → [{name, labels, value}]; enough of the format for what prometheus_client writes.
function parseMetrics(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line[0] === '#') continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

const live = {
  timer: null,
  samples: [],   // {t (s), rows, requests}: the last 5 minutes

  start() {
    if (this.timer) return;
    this.scrape();
    this.timer = setInterval(() => this.scrape(), 2000);
  },

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  },

  async scrape() {
    const r = await api('metrics');
    if (!r.ok) { $('#live-stats').replaceChildren(el('div', { class: 'error', text: errorText(r) })); return; }
    const m = parseMetrics(typeof r.data === 'string' ? r.data : String(r.data));
    const sum = (name, keep = () => true) => m.filter((x) => x.name === name && keep(x.labels)).reduce((s, x) => s + x.value, 0);
    // The page's own reads (/metrics, /ui) are not load, and probes are not errors: /readyz answers 503 by design
    // while the RM loads.
    const probes = new Set(['/metrics', '/healthz', '/readyz']);
    const isApi = (l) => !probes.has(l.endpoint) && !(l.endpoint || '').startsWith('/ui');
    const now = performance.now() / 1000;
    const totals = {
      rows: sum('tokencredit_rm_rows_total'),
      requests: sum('tokencredit_requests_total', isApi),
      errors_5xx: sum('tokencredit_requests_total', (l) => isApi(l) && Number(l.status) >= 500),
      errors_4xx: sum('tokencredit_requests_total', (l) => isApi(l) && Number(l.status) >= 400 && Number(l.status) < 500),
      worker_failures: sum('tokencredit_worker_failures_total'),
      queue_depth: sum('tokencredit_queue_depth'),
      cache_hits: sum('tokencredit_cache_hits_total'),
      cache_misses: sum('tokencredit_cache_misses_total'),
    };
    this.samples.push({ t: now, rows: totals.rows, requests: totals.requests });
    this.samples = this.samples.filter((s) => now - s.t <= 300);
    const ref = this.samples.find((s) => now - s.t <= 10.5) || this.samples[this.samples.length - 1];
    const dt = now - ref.t;
    const rowsPerS = dt > 0 ? (totals.rows - ref.rows) / dt : 0;
    const reqPerS = dt > 0 ? (totals.requests - ref.requests) / dt : 0;
    const lookups = totals.cache_hits + totals.cache_misses;
    const hitRate = lookups ? totals.cache_hits / lookups : null;
    const stats = [
      ['rows_per_s', rowsPerS.toFixed(1), 'RM rows / s', rowsPerS],
      ['requests_per_s', reqPerS.toFixed(2), 'requests / s', reqPerS],
      ['queue_depth', String(totals.queue_depth), 'items queued or running', totals.queue_depth],
      ['cache_hit_rate', hitRate === null ? (config.mode === 'celery' ? 'none yet' : 'no cache') : (100 * hitRate).toFixed(1) + ' %',
        config.mode === 'celery' ? `cache hits (${totals.cache_hits} of ${lookups})` : 'cache hits (Celery mode only)', hitRate === null ? '' : hitRate],
      ['errors_5xx', String(totals.errors_5xx), 'server errors (5xx)', totals.errors_5xx],
      ['errors_4xx', String(totals.errors_4xx), 'refused requests (4xx)', totals.errors_4xx],
      ['worker_failures', String(totals.worker_failures), 'worker failures', totals.worker_failures],
      ['rows_total', String(totals.rows), 'RM rows since start', totals.rows],
    ];
    $('#live-stats').replaceChildren(...stats.map(([key, v, k, raw]) =>
      el('div', { class: 'stat', 'data-stat': key, 'data-value': String(raw) }, el('div', { class: 'v', text: v }), el('div', { class: 'k', text: k }))));
    this.chart();
  },

  chart() {
    const svg = $('#live-chart');
    svg.replaceChildren();
    const W = 640, H = 120, pts = [];
    for (let i = 1; i < this.samples.length; i++) {
      const a = this.samples[i - 1], b = this.samples[i];
      if (b.t > a.t) pts.push([b.t, (b.rows - a.rows) / (b.t - a.t)]);
    }
    svg.append(svgEl('line', { x1: 0, y1: H - 1, x2: W, y2: H - 1, stroke: '#999' }));
    if (!pts.length) return;
    const now = this.samples[this.samples.length - 1].t;
    const top = Math.max(1, ...pts.map((p) => p[1]));
    const d = pts.map(([t, v], i) => `${i ? 'L' : 'M'}${(W * (1 - (now - t) / 300)).toFixed(1)},${(H - 4 - (H - 10) * v / top).toFixed(1)}`).join('');
    svg.append(svgEl('path', { d, fill: 'none', stroke: '#2166ac', 'stroke-width': 1.5 }));
    const t = svgEl('text', { x: 4, y: 12 });
    t.textContent = `${top.toFixed(0)} rows/s`;
    svg.append(t);
  },
};

// ------------------------------------------------------------------------------------------------ start
async function loadInfo() {
  for (;;) {
    const r = await api('v1/info');
    if (r.ok) { info = r.data; break; }
    $('#model-info').textContent = r.status === 503 ? 'the reward model is loading…'
      : r.status === 401 ? 'this server asks for its API token (TOKENCREDIT_API_TOKEN): enter it above' : errorText(r);
    await new Promise((ok) => setTimeout(ok, 3000));
  }
  const m = info.model;
  $('#model-info').textContent = `${m.name} (${m.kind}, ${m.device}) · shaping v${info.shaping.version}` +
    (info.shaping.deployment ? ` · ${info.shaping.deployment}` : '');
}

function setupApiToken() {
  $('#api-token-form').hidden = false;
  const use = () => {
    const value = $('#api-token').value.trim();
    apiToken = value || null;
    $('#api-token').value = '';   // not left in the DOM
    $('#api-token-status').textContent = apiToken ? 'token in use' : '';
  };
  $('#api-token-use').addEventListener('click', use);
  $('#api-token').addEventListener('keydown', (ev) => { if (ev.key === 'Enter') use(); });
}

async function start() {
  const c = await api('ui/config.json');
  if (c.ok) config = c.data;
  if (config.api_token_required) setupApiToken();
  await loadInfo();
  explain.setup();
  shaping.setup();
  window.addEventListener('hashchange', route);
  route();
  document.body.setAttribute('data-ready', 'true');
}

start();
