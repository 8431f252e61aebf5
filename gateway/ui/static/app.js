// stepchain trace viewer: plain JavaScript, no build step, no third-party code.
// Reads the gateway's JSON API with the key kept in sessionStorage; every value from the API is
// put into the page as text (textContent), never as HTML.
"use strict";

const KEY_NAME = "stepchain.key";
const POLL_MS = 1500; // live pages poll no faster than this (the issue asks for >= 1 s)
const STATUSES = ["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"];
const LIVE = new Set(["queued", "in_progress"]);

let timer = null;        // the current view's refresh timer
let streamAbort = null;  // the current view's SSE reader
let viewToken = 0;       // bumps on every navigation: stale async work checks it

// -- small helpers ------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function key() { return sessionStorage.getItem(KEY_NAME) || ""; }

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path) {
  const headers = { accept: "application/json" };
  if (key()) headers.authorization = "Bearer " + key();
  const res = await fetch(path, { headers, cache: "no-store" });
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const message = (body && body.error && body.error.message) || res.statusText;
    throw new ApiError(res.status, message);
  }
  return body;
}

function fmtTime(t) {
  if (t === null || t === undefined) return "—";
  const d = new Date(t * 1000);
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}
function fmtDur(s) {
  if (s === null || s === undefined) return "—";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 60) return s.toFixed(2) + " s";
  return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}
function fmtCost(c) {
  if (c === null || c === undefined) return "—";
  if (c === 0) return "$0";
  if (c < 0.01) return "$" + c.toPrecision(3);
  return "$" + c.toFixed(4);
}
function costTitle(c) {
  return c === null || c === undefined ? "unknown: no price is configured for this model" : "USD";
}
function fmtInt(n) { return n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"); }
function badge(status) {
  return h("span", { class: "badge " + status + (LIVE.has(status) || status === "processing" ? " pulse" : ""),
    "data-testid": "status" }, status.replace("_", " "));
}
function pretty(value) {
  if (typeof value === "string") {
    try { return JSON.stringify(JSON.parse(value), null, 2); } catch (_) { return value; }
  }
  return JSON.stringify(value, null, 2);
}
function jsonBlock(value, testid) { return h("pre", { class: "json", "data-testid": testid }, pretty(value)); }

function stopLive() {
  if (timer) { clearTimeout(timer); timer = null; }
  if (streamAbort) { streamAbort.abort(); streamAbort = null; }
}

function render(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

// -- key and errors -------------------------------------------------------------------------------

function showKeyForm(message) {
  stopLive();
  const input = h("input", { type: "password", id: "api-key", placeholder: "sk-… (admin key or tenant key)",
    autocomplete: "off", "data-testid": "key-input" });
  const form = h("form", { class: "card keyform", onsubmit: (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_NAME, input.value.trim());
    route();
  } },
  h("h1", {}, "API key"),
  h("p", { class: "muted" }, "Enter the gateway's admin key to see every tenant's responses, or a tenant key to see that tenant's. It is kept in this browser tab only (sessionStorage)."),
  message ? h("div", { class: "error-box" }, message) : null,
  input,
  h("button", { class: "primary", type: "submit", "data-testid": "key-submit" }, "Open traces"));
  render(form);
  input.focus();
}

function handleError(err) {
  if (err instanceof ApiError && err.status === 401) {
    showKeyForm(key() ? "That key was not accepted." : null);
    return;
  }
  render(h("div", { class: "error-box", "data-testid": "error" }, String(err.message || err)),
    h("a", { href: "#/" }, "← Back to responses"));
}

function setWho(admin) {
  const who = document.getElementById("who");
  who.textContent = !key() ? "open gateway" : admin ? "admin key" : "tenant key";
}

// -- the list of responses --------------------------------------------------------------------------

function listView(params) {
  const token = viewToken;
  const status = h("select", { "data-testid": "filter-status" },
    h("option", { value: "" }, "All statuses"),
    STATUSES.map((s) => h("option", { value: s }, s.replace("_", " "))));
  status.value = params.get("status") || "";
  const model = h("input", { placeholder: "Model", value: params.get("model") || "", "data-testid": "filter-model" });
  const search = h("input", { class: "grow", placeholder: "Search by response id", value: params.get("q") || "",
    "data-testid": "search" });
  const apply = () => {
    const q = new URLSearchParams();
    if (status.value) q.set("status", status.value);
    if (model.value.trim()) q.set("model", model.value.trim());
    if (search.value.trim()) q.set("q", search.value.trim());
    location.hash = "#/" + (q.toString() ? "?" + q : "");
  };
  status.addEventListener("change", apply);
  const filters = h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); apply(); } },
    status, model, search, h("button", { type: "submit" }, "Filter"),
    h("button", { type: "button", onclick: () => route() }, "Refresh"));

  const tbody = h("tbody");
  const headRow = h("tr");
  const table = h("table", { class: "list", "data-testid": "responses" }, h("thead", {}, headRow), tbody);
  const more = h("div", { class: "more" });
  render(h("h1", {}, "Responses"), h("p", { class: "muted" }, "Newest first. Click a response to see its step chain."),
    filters, table, more);

  let admin = false;
  let rows = [];
  const query = (after) => {
    const q = new URLSearchParams({ limit: "25" });
    for (const k of ["status", "model", "q"]) if (params.get(k)) q.set(k, params.get(k));
    if (after) q.set("after", after);
    return "/v1/stepchain/responses?" + q;
  };
  const draw = () => {
    const cols = ["Time", "Response", "Status", "Model"].concat(admin ? ["Tenant"] : [],
      ["Steps", "Tokens", "Cost", "Duration"]);
    headRow.replaceChildren(...cols.map((c) => h("th", { class: ["Steps", "Tokens", "Cost", "Duration"].includes(c) ? "num" : "" }, c)));
    if (!rows.length) {
      tbody.replaceChildren(h("tr", {}, h("td", { class: "empty", colspan: cols.length }, "No responses yet.")));
      return;
    }
    tbody.replaceChildren(...rows.map((r) => h("tr", {
      "data-testid": "response-row", dataset: { id: r.id },
      onclick: () => { location.hash = "#/responses/" + encodeURIComponent(r.id); } },
      h("td", {}, fmtTime(r.created_at)),
      h("td", { class: "mono" }, h("a", { href: "#/responses/" + encodeURIComponent(r.id) }, r.id)),
      h("td", {}, badge(r.status)),
      h("td", {}, r.model),
      admin ? h("td", { class: "mono muted" }, r.tenant || "—") : null,
      h("td", { class: "num", title: `${r.model_calls} model calls, ${r.tool_calls} tool calls` }, r.steps),
      h("td", { class: "num", title: `${fmtInt(r.input_tokens)} in / ${fmtInt(r.output_tokens)} out` }, fmtInt(r.total_tokens)),
      h("td", { class: "num", title: costTitle(r.cost_usd) }, fmtCost(r.cost_usd)),
      h("td", { class: "num" }, LIVE.has(r.status) ? "running" : fmtDur(r.duration_s)))));
  };
  const load = async (after) => {
    const page = await api(query(after));
    if (token !== viewToken) return null;
    admin = page.admin;
    setWho(admin);
    rows = after ? rows.concat(page.data) : page.data;
    draw();
    more.replaceChildren(...(page.has_more
      ? [h("button", { "data-testid": "load-more", onclick: () => load(page.last_id).catch(handleError) }, "Load more")]
      : []));
    return page;
  };
  const refresh = async () => {
    // Only the first page is refreshed, and only while something on it is still running.
    if (token !== viewToken) return;
    if (rows.some((r) => LIVE.has(r.status)) && !document.hidden) {
      try {
        const page = await api(query(null));
        if (token !== viewToken) return;
        const fresh = new Map(page.data.map((r) => [r.id, r]));
        rows = rows.map((r) => fresh.get(r.id) || r);
        for (const r of page.data.slice().reverse()) if (!rows.some((x) => x.id === r.id)) rows.unshift(r);
        draw();
      } catch (_) { /* keep what is shown */ }
    }
    timer = setTimeout(refresh, POLL_MS * 2);
  };
  load(null).then(() => { timer = setTimeout(refresh, POLL_MS * 2); }).catch(handleError);
}

// -- one response ------------------------------------------------------------------------------------

function outputText(response) {
  const parts = [];
  for (const item of response.output || []) {
    if (item.type === "message") {
      for (const c of item.content || []) if (c.type === "output_text") parts.push(c.text);
    }
  }
  return parts.join("\n");
}

function stepName(step) {
  const p = step.request_payload || {};
  if (step.kind === "model_call") return p.model || "model call";
  return p.name || "tool call";
}

function stepUsage(step) {
  const u = step.usage || {};
  const i = u.prompt_tokens ?? u.input_tokens ?? 0;
  const o = u.completion_tokens ?? u.output_tokens ?? 0;
  return { input: i, output: o, cost: u.stepchain ? u.stepchain.cost_usd : null, known: !!step.usage };
}

function responseView(id, selectedStep) {
  const token = viewToken;
  const state = { response: null, steps: [], selected: selectedStep || null, collapsed: new Set(), liveText: "",
    chain: null, summary: null };
  const headCard = h("section", { class: "card", "data-testid": "response-head" });
  const answerCard = h("section", { class: "card" });
  const wfCard = h("section", { class: "card" });
  const inspector = h("aside", { class: "card inspector", "data-testid": "inspector" });
  render(h("p", {}, h("a", { href: "#/" }, "← Responses")), headCard, answerCard,
    h("div", { class: "split" }, wfCard, inspector));

  const select = (stepId) => {
    state.selected = stepId;
    history.replaceState(null, "", "#/responses/" + encodeURIComponent(id) + (stepId ? "/steps/" + encodeURIComponent(stepId) : ""));
    drawWaterfall();
    drawInspector();
  };

  const drawHead = () => {
    const r = state.response;
    const totals = state.steps.reduce((acc, s) => {
      if (s.kind !== "model_call") return acc;
      const u = stepUsage(s);
      acc.input += u.input; acc.output += u.output;
      if (u.known) acc.cost = acc.cost === null || u.cost === null || u.cost === undefined ? null : acc.cost + u.cost;
      return acc;
    }, { input: 0, output: 0, cost: 0 });
    // Exact times come from the steps (the Response object's are whole seconds).
    const first = Math.min(...state.steps.map((s) => s.created_at));
    const last = Math.max(...state.steps.map((s) => s.finished_at ?? 0));
    const duration = !state.steps.length ? (r.completed_at ? r.completed_at - r.created_at : null)
      : LIVE.has(r.status) ? Date.now() / 1000 - first : Math.max(last - first, 0);
    const fact = (k, v, attrs) => h("div", { class: "fact" }, h("div", { class: "k" }, k), h("div", Object.assign({ class: "v" }, attrs || {}), v));
    const links = h("div", { class: "links" });
    if (r.previous_response_id) {
      links.append(h("span", {}, "Previous response: ",
        h("a", { class: "mono", href: "#/responses/" + encodeURIComponent(r.previous_response_id), "data-testid": "previous-link" }, r.previous_response_id)));
    }
    const conv = r.conversation && (r.conversation.id || r.conversation);
    if (conv) links.append(h("span", {}, "Conversation: ", h("span", { class: "mono" }, String(conv))));
    if (state.chain && state.chain.length > 1) {
      links.append(h("span", { "data-testid": "conversation" }, "Conversation: ",
        ...state.chain.map((rid, i) => [i ? " → " : "", rid === r.id ? h("b", { class: "mono" }, "this")
          : h("a", { class: "mono", href: "#/responses/" + encodeURIComponent(rid) }, rid.slice(0, 14) + "…")])));
    }
    headCard.replaceChildren(
      h("div", { class: "head" },
        h("div", { class: "title" }, h("h1", { class: "mono" }, r.id), h("div", {}, badge(r.status), " ",
          h("span", { class: "muted" }, r.model))),
      ),
      h("div", { class: "facts" },
        fact("Created", fmtTime(r.created_at)),
        fact("Duration", (LIVE.has(r.status) ? "running " : "") + fmtDur(duration)),
        fact("Steps", String(state.steps.length)),
        fact("Input tokens", fmtInt(totals.input)),
        fact("Output tokens", fmtInt(totals.output)),
        fact("Cost", fmtCost(totals.cost), { title: costTitle(totals.cost), "data-testid": "response-cost" })),
      ...[links, r.error ? h("div", { class: "error-box", style: "margin-top:12px" }, (r.error.code || "error") + ": " + r.error.message) : null].filter(Boolean));
  };

  const drawAnswer = () => {
    const r = state.response;
    const live = LIVE.has(r.status);
    const text = live ? state.liveText : outputText(r);
    answerCard.replaceChildren(h("h2", {}, live ? "Answer (forming)" : "Answer"),
      h("div", { class: "answer" + (live ? " live" : ""), "data-testid": "answer" },
        text || (live ? "" : h("span", { class: "muted" }, "No text output."))));
  };

  const drawWaterfall = () => {
    const steps = state.steps;
    if (!steps.length) {
      wfCard.replaceChildren(h("h2", {}, "Step chain"), h("p", { class: "muted" }, "No steps recorded yet."));
      return;
    }
    const now = Date.now() / 1000;
    const r = state.response;
    // The Response object's times are whole seconds; the steps' are exact: the axis is theirs.
    const t0 = Math.min(...steps.map((s) => s.started_at ?? s.created_at));
    const ends = steps.map((s) => s.finished_at ?? (s.started_at ? now : s.created_at));
    const t1 = Math.max(...ends, t0 + 0.001);
    const span = t1 - t0;
    const pct = (t) => ((t - t0) / span) * 100;
    const children = new Map();
    for (const s of steps) {
      const k = s.scope_parent || "";
      if (!children.has(k)) children.set(k, []);
      children.get(k).push(s);
    }
    const rows = [];
    const walk = (parent, depth) => {
      for (const s of (children.get(parent) || []).sort((a, b) => a.sequence - b.sequence)) {
        const kids = children.get(s.id) || [];
        const agent = kids.length > 0;
        const start = s.started_at ?? s.created_at;
        const end = s.finished_at ?? (s.started_at ? now : start);
        const attempts = (s.attempts || []).length;
        const bar = h("div", {
          class: ["bar", agent ? "agent" : s.kind, s.state, attempts ? "retried" : ""].join(" "),
          style: `left:${pct(start)}%;width:${Math.max(pct(end) - pct(start), 0.4)}%`,
          title: `${stepName(s)} · ${s.state} · ${fmtDur(end - start)}`,
          "data-testid": "bar", dataset: { stepId: s.id, kind: s.kind, name: stepName(s), state: s.state } });
        const label = h("div", { class: "wf-label", style: `padding-left:${depth * 18}px` },
          agent ? h("button", { class: "toggle", type: "button", "data-testid": "toggle", title: "Show or hide this agent's steps",
            onclick: (e) => { e.stopPropagation(); state.collapsed.has(s.id) ? state.collapsed.delete(s.id) : state.collapsed.add(s.id); drawWaterfall(); } },
          state.collapsed.has(s.id) ? "▸" : "▾") : h("span", { class: "toggle" }),
          h("span", { class: "kind " + (agent ? "agent" : s.kind === "model_call" ? "model" : "tool") }, agent ? "AGENT" : s.kind === "model_call" ? "MODEL" : "TOOL"),
          h("span", { class: "name", title: stepName(s) }, stepName(s)),
          attempts ? h("span", { class: "retry", title: `${attempts} failed attempt(s) before this one`, "data-testid": "retries" }, "↻" + attempts) : null);
        const track = h("div", { class: "wf-track" }, bar,
          h("span", { class: "bar-time", style: pct(end) < 85 ? `left:${pct(end)}%`
            : `right:${100 - pct(start)}%;padding:0 6px 0 0` }, fmtDur(end - start)));
        rows.push(h("div", { class: "wf-row" + (state.selected === s.id ? " selected" : ""), "data-testid": "wf-row",
          dataset: { stepId: s.id }, onclick: () => select(s.id) }, label, track));
        if (agent && !state.collapsed.has(s.id)) walk(s.id, depth + 1);
      }
    };
    walk("", 0);
    const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => h("span", { style: `left:${f * 100}%` }, fmtDur(span * f)));
    wfCard.replaceChildren(h("h2", {}, "Step chain"),
      h("div", { class: "wf", "data-testid": "waterfall" },
        h("div", { class: "wf-axis" }, h("div", {}, "step"), h("div", { class: "ticks" }, ...ticks)), ...rows),
      h("div", { class: "legend" },
        h("span", {}, h("i", { style: "background:var(--model)" }), "model call"),
        h("span", {}, h("i", { style: "background:var(--tool)" }), "tool call"),
        h("span", {}, h("i", { style: "background:var(--agent)" }), "agent (sub-agent steps nested)"),
        h("span", {}, h("i", { style: "background:var(--bad)" }), "failed"),
        h("span", {}, h("span", { class: "retry" }, "↻n"), " retried attempts")));
  };

  const drawInspector = () => {
    const s = state.steps.find((x) => x.id === state.selected);
    if (!s) {
      inspector.replaceChildren(h("h2", {}, "Step"), h("p", { class: "muted" }, "Select a step in the chain to inspect it."));
      return;
    }
    const u = stepUsage(s);
    const p = s.request_payload || {};
    const dur = s.started_at && s.finished_at ? s.finished_at - s.started_at : null;
    const rows = [
      ["Kind", s.kind], ["State", badge(s.state)], ["Step", h("span", { class: "mono" }, s.id)], ["Sequence", s.sequence],
      s.scope_parent ? ["Scope", h("a", { href: "#", class: "mono", onclick: (e) => { e.preventDefault(); select(s.scope_parent); } }, s.scope_parent)] : null,
      p.call_id ? ["call_id", h("span", { class: "mono" }, p.call_id)] : null,
      ["Attempt", s.attempt], s.upstream ? ["Upstream", s.upstream] : null,
      ["Created", fmtTime(s.created_at)], ["Started", fmtTime(s.started_at)], ["Finished", fmtTime(s.finished_at)],
      ["Duration", fmtDur(dur)],
      s.kind === "model_call" ? ["Tokens", u.known ? `${fmtInt(u.input)} in / ${fmtInt(u.output)} out` : "—"] : null,
      s.kind === "model_call" ? ["Cost", h("span", { title: costTitle(u.cost), "data-testid": "step-cost" }, u.known ? fmtCost(u.cost) : "—")] : null,
    ].filter(Boolean);
    const sections = [h("h2", {}, stepName(s)), h("dl", {}, ...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))];
    if (s.error) sections.push(h("h3", {}, "Error"), h("pre", { class: "json err", "data-testid": "step-error" }, pretty(s.error)));
    if ((s.attempts || []).length) sections.push(h("h3", {}, "Failed attempts"), jsonBlock(s.attempts, "step-attempts"));
    if (s.kind === "model_call") {
      sections.push(h("h3", {}, "Upstream request (exact body)"), jsonBlock(s.request_payload, "step-request"));
      sections.push(h("h3", {}, "Completion (reassembled)"),
        s.response_payload === null || s.response_payload === undefined ? h("p", { class: "muted" }, "None yet.") : jsonBlock(s.response_payload, "step-response"));
      if (s.usage) sections.push(h("h3", {}, "Usage"), jsonBlock(s.usage, "step-usage"));
    } else {
      sections.push(h("h3", {}, "Arguments"), jsonBlock(p.arguments ?? {}, "step-arguments"));
      sections.push(h("h3", {}, "Output"),
        s.response_payload === null || s.response_payload === undefined ? h("p", { class: "muted" }, s.finished_at ? "None." : "Running…") : jsonBlock(s.response_payload, "step-output"));
    }
    inspector.replaceChildren(...sections);
  };

  const drawAll = () => { drawHead(); drawAnswer(); drawWaterfall(); drawInspector(); };

  const load = async () => {
    const [response, steps] = await Promise.all([
      api("/v1/responses/" + encodeURIComponent(id)),
      api("/v1/responses/" + encodeURIComponent(id) + "/steps"),
    ]);
    if (token !== viewToken) return false;
    state.response = response;
    state.steps = steps.data;
    drawAll();
    return LIVE.has(response.status);
  };

  const follow = async () => {
    // The text as it forms: the response's own event stream (SSE over fetch, with the key).
    const ctrl = new AbortController();
    streamAbort = ctrl;
    const headers = { accept: "text/event-stream" };
    if (key()) headers.authorization = "Bearer " + key();
    try {
      const res = await fetch("/v1/responses/" + encodeURIComponent(id) + "?stream=true", { headers, signal: ctrl.signal });
      if (!res.ok || !res.body) return;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done || token !== viewToken) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (!data || data === "[DONE]") continue;
          let ev;
          try { ev = JSON.parse(data); } catch (_) { continue; }
          if (ev.type === "response.output_text.delta") {
            state.liveText += ev.delta;
            if (state.response && LIVE.has(state.response.status)) drawAnswer();
          }
        }
      }
    } catch (_) { /* aborted or cut: polling carries on */ }
  };

  const poll = async () => {
    if (token !== viewToken) return;
    let live = true;
    try { live = await load(); } catch (err) { handleError(err); return; }
    if (live) timer = setTimeout(poll, POLL_MS);
  };

  const walkChain = async () => {
    // The conversation: this response's previous_response_id chain, oldest first (up to 20).
    const ids = [id];
    let prev = state.response && state.response.previous_response_id;
    while (prev && ids.length < 20) {
      ids.unshift(prev);
      try { prev = (await api("/v1/responses/" + encodeURIComponent(prev))).previous_response_id; } catch (_) { break; }
    }
    if (token !== viewToken) return;
    state.chain = ids;
    drawHead();
  };

  load().then((live) => {
    if (token !== viewToken) return;
    if (live) { follow(); timer = setTimeout(poll, POLL_MS); }
    if (state.response && state.response.previous_response_id) walkChain();
  }).catch(handleError);
}

// -- routing ------------------------------------------------------------------------------------------

function route() {
  stopLive();
  viewToken += 1;
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const m = path.match(/^\/responses\/([^/]+)(?:\/steps\/([^/]+))?$/);
  if (m) responseView(decodeURIComponent(m[1]), m[2] ? decodeURIComponent(m[2]) : null);
  else listView(new URLSearchParams(query || ""));
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("change-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_NAME);
    showKeyForm(null);
  });
  route();
});
