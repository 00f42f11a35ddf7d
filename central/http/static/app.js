// The dashboard's pages: sign-in, fleet (/), a device (/devices/ID), a document (/documents/ID).
// Every string comes from one table per language (/static/i18n/vi.json, en.json); Vietnamese unless
// the reader switched. Everything from devices and documents (names, errors, OCR text) is inserted
// with textContent, never as HTML, and the page's policy forbids inline script.
"use strict";

const LANGS = ["vi", "en"];
const TZ = "Asia/Ho_Chi_Minh";
let lang = LANGS.includes(localStorage.getItem("sohoa.lang")) ? localStorage.getItem("sohoa.lang") : "vi";
let S = {};
let session = null;

// -- strings, numbers, times -------------------------------------------------------------------
function t(key, params) {
  let text = Object.prototype.hasOwnProperty.call(S, key) ? S[key] : key;
  for (const [name, value] of Object.entries(params || {})) text = text.split("{" + name + "}").join(String(value));
  return text;
}

// Why a document's original has not come (GET /api/documents: awaiting_reason): on its way over the
// commune's link, or its box was revoked — replaced by a box that sends it once its held scans are
// retried, or not replaced, so someone must fetch the box or the paper.
function awaitingKey(doc) {
  if (doc.awaiting_reason === "box_revoked") return "awaiting_box_revoked";
  if (doc.awaiting_reason === "box_replaced") return "awaiting_box_replaced";
  if (doc.awaiting_reason === "transfer_refused") return "awaiting_transfer_refused";
  return "awaiting_original";
}

const locale = () => (lang === "vi" ? "vi-VN" : "en-GB");
const number = (n) => new Intl.NumberFormat(locale()).format(n);

function bytes(n) {
  if (n === null || n === undefined) return t("dash");
  const units = ["byte", "kilobyte", "megabyte", "gigabyte", "terabyte"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return new Intl.NumberFormat(locale(), { style: "unit", unit: units[i], unitDisplay: "short",
                                           maximumFractionDigits: i ? 1 : 0 }).format(n);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return t("dash");
  const [value, unit] = seconds < 90 ? [seconds, "second"] : seconds < 5400 ? [seconds / 60, "minute"]
    : seconds < 172800 ? [seconds / 3600, "hour"] : [seconds / 86400, "day"];
  return new Intl.NumberFormat(locale(), { style: "unit", unit, unitDisplay: "long",
                                           maximumFractionDigits: unit === "second" || unit === "minute" ? 0 : 1 })
    .format(value);
}

function when(iso) {
  if (!iso) return t("never");
  return new Intl.DateTimeFormat(locale(), { timeZone: TZ, dateStyle: "short", timeStyle: "short" })
    .format(new Date(iso));
}

function ago(iso) {
  if (!iso) return "";
  const seconds = (new Date(iso).getTime() - Date.now()) / 1000;
  const abs = Math.abs(seconds);
  const [value, unit] = abs < 60 ? [seconds, "second"] : abs < 3600 ? [seconds / 60, "minute"]
    : abs < 86400 ? [seconds / 3600, "hour"] : [seconds / 86400, "day"];
  return new Intl.RelativeTimeFormat(locale(), { numeric: "auto" }).format(Math.round(value), unit);
}

function whenAgo(iso) { return iso ? when(iso) + " (" + ago(iso) + ")" : t("never"); }

// -- DOM helpers -----------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node[name] = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// replaceChildren without the absent parts (a null child would be drawn as the text "null").
function fill(node, ...children) { node.replaceChildren(...children.filter((c) => c !== null && c !== undefined)); }

function translateStatic() {
  document.documentElement.lang = lang;
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  const button = document.getElementById("lang");
  if (button) {
    button.textContent = t("switch_to");
    button.setAttribute("aria-label", t("switch_label"));
    button.lang = lang === "vi" ? "en" : "vi";
    button.onclick = () => { localStorage.setItem("sohoa.lang", lang === "vi" ? "en" : "vi"); location.reload(); };
  }
}

function setStatus(text, bad) {
  const status = document.getElementById("status");
  if (!status) return;
  status.textContent = text;
  status.className = bad ? "bad" : "";
}

// A table that becomes one card per row on a phone: every cell carries its column's name.
function table(columns, rows, caption) {
  const head = el("tr", {}, ...columns.map((c) => el("th", { scope: "col", class: c.num ? "num" : null },
    c.sort ? el("button", { type: "button", "data-sort": c.sort, title: t("sort_by", { column: c.label }) }, c.label)
      : c.label)));
  const body = el("tbody");
  for (const row of rows) {
    const tr = el("tr");
    columns.forEach((c, i) => {
      const value = row[i];
      const td = el("td", { "data-label": c.label, class: c.num ? "num" : null });
      if (value instanceof Node) td.append(value);
      else if (Array.isArray(value)) td.append(...value);
      else td.textContent = value === null || value === undefined || value === "" ? t("dash") : String(value);
      tr.append(td);
    });
    body.append(tr);
  }
  return el("table", { class: "cards" }, caption ? el("caption", { class: "visually-hidden" }, caption) : null,
            el("thead", {}, head), body);
}

// -- the API -------------------------------------------------------------------------------------
async function call(path, method) {
  const options = { method: method || "GET", credentials: "same-origin", headers: {} };
  if (session && options.method !== "GET") options.headers["X-CSRF-Token"] = session.csrf;
  const response = await fetch(path, options);
  if (response.status === 401) { location.reload(); throw new Error("signed out"); }
  return response;
}

async function api(path, method) {
  const response = await call(path, method);
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

function deviceState(d) {
  if (d.status === "revoked") return ["state_revoked", "off"];
  if (!d.last_seen) return ["state_never", "warn"];
  return d.online ? ["state_online", "on"] : ["state_offline", "off"];
}

function stateCell(d) {
  const [key, cls] = deviceState(d);
  return el("span", { class: cls, "data-state": key.slice(6) }, t(key));
}

function cloneBadge(clone) {
  return el("span", {},
    el("span", { class: "badge clone", title: t("clone_title", { seq: clone.seq, a: clone.tids[0], b: clone.tids[1] }) },
       t("clone_badge")),
    el("small", {}, " " + t("clone_note", { since: when(clone.since), count: clone.count })));
}

function deviceLink(id) { return el("a", { href: "/devices/" + encodeURIComponent(id) }, id); }

function segments(pieces) {
  return (pieces || []).map(([text, hit]) => (hit ? el("mark", {}, text) : document.createTextNode(text)));
}

// -- the fleet page ---------------------------------------------------------------------------------
const DEVICE_PAGE = 100, DOC_PAGE = 50;
const view = { sort: "problems", order: "desc", q: "", offset: 0, total: 0 };
const docs = { q: "", device: "", since: "", until: "", offset: 0 };

function stat(label, value, cls, note) {
  return el("div", {}, el("dt", {}, label), el("dd", { class: cls || null }, value, note ? el("small", {}, note) : null));
}

async function loadFleet() {
  const f = await api("/api/fleet");
  const d = f.devices, b = f.backlog;
  const list = el("dl", { id: "fleet", class: "stats" },
    stat(t("stat_devices"), number(d.total)),
    stat(t("stat_online"), number(d.online), "on"),
    stat(t("stat_offline"), number(d.offline), d.offline ? "off" : ""),
    stat(t("stat_revoked"), number(d.revoked)),
    stat(t("stat_with_error"), number(d.with_error), d.with_error ? "bad" : ""),
    stat(t("stat_possible_clone"), number(d.possible_clone), d.possible_clone ? "bad" : "",
         d.possible_clone ? t("stat_possible_clone_note") : null),
    stat(t("stat_offline_backlog"), number(d.offline_with_backlog), d.offline_with_backlog ? "bad" : ""),
    stat(t("stat_backlog"), number(b.docs), b.docs ? "warn" : "",
         t("stat_backlog_note", { bytes: bytes(b.bytes), boxes: number(d.with_backlog) })),
    stat(t("stat_oldest"), duration(b.oldest_age_s), "", b.oldest_device || null),
    stat(t("stat_today"), number(f.documents.today)),
    stat(t("stat_total"), number(f.documents.total), "",
         t("stat_total_note", { objects: number(f.documents.objects), bytes: bytes(f.documents.bytes) })),
    // Catalogued from a notice of a box revoked and not replaced: nobody will send those originals.
    f.documents.awaiting_from_revoked
      ? stat(t("stat_awaiting_revoked"), number(f.documents.awaiting_from_revoked), "bad", t("stat_awaiting_revoked_note"))
      : null);
  document.getElementById("fleet").replaceWith(list);
}

const DEVICE_COLUMNS = () => [
  { label: t("col_problem"), sort: "problems" }, { label: t("col_device"), sort: "id" },
  { label: t("col_state"), sort: "online" }, { label: t("col_last_seen"), sort: "last_seen" },
  { label: t("col_backlog_docs"), sort: "backlog_docs", num: true },
  { label: t("col_backlog_bytes"), sort: "backlog_bytes", num: true },
  { label: t("col_oldest"), sort: "oldest_age_s", num: true }, { label: t("col_last_receipt"), sort: "last_receipt" },
  { label: t("col_last_error"), sort: "last_error" }];

async function revoke(id) {
  if (!confirm(t("revoke_confirm", { id }))) return;
  await api("/api/devices/" + encodeURIComponent(id) + "/revoke", "POST");
  refreshFleet();
}

async function clearClone(id) {
  if (!confirm(t("clear_clone_confirm", { id }))) return;
  await api("/api/devices/" + encodeURIComponent(id) + "/clear-clone", "POST");
  refreshFleet();
}

async function loadDevices() {
  const p = new URLSearchParams({ sort: view.sort, order: view.order, limit: DEVICE_PAGE, offset: view.offset });
  if (view.q) p.set("q", view.q);
  const response = await call("/api/devices?" + p);
  if (!response.ok) throw new Error("/api/devices: HTTP " + response.status);
  view.total = Number(response.headers.get("X-Total-Count") || 0);
  const devices = await response.json();
  const columns = DEVICE_COLUMNS();
  const admin = session && session.role === "admin";
  if (admin) columns.push({ label: t("col_actions") });
  const rows = devices.map((d) => {
    const problem = d.possible_clone ? cloneBadge(d.possible_clone)
      : d.problem ? el("span", { class: d.problem === "offline" ? "warn" : "bad" }, t("problem_" + d.problem)) : "";
    const row = [problem, deviceLink(d.id), stateCell(d), whenAgo(d.last_seen), number(d.backlog_docs),
                 bytes(d.backlog_bytes), d.backlog_docs ? duration(d.oldest_age_s) : "", whenAgo(d.last_receipt),
                 d.last_error];
    if (admin) {
      const actions = [];
      if (d.status === "active") actions.push(el("button", { type: "button", onclick: () => revoke(d.id) }, t("revoke")));
      if (d.possible_clone) actions.push(" ", el("button", { type: "button", onclick: () => clearClone(d.id) }, t("clear_clone")));
      row.push(actions);
    }
    return row;
  });
  const tbl = table(columns, rows, t("devices", { count: view.total }));
  tbl.id = "devices";
  tbl.dataset.count = String(devices.length);
  document.getElementById("devices").replaceWith(tbl);
  for (const button of tbl.querySelectorAll("th button")) {
    button.classList.toggle("sorted", button.dataset.sort === view.sort);
    button.classList.toggle("asc", view.order === "asc");
    button.onclick = () => sortBy(button.dataset.sort);
  }
  document.getElementById("device-heading").textContent = t("devices", { count: number(view.total) });
  document.getElementById("device-range").textContent = view.total
    ? t("range", { from: view.offset + 1, to: view.offset + devices.length, total: number(view.total) }) : t("none");
  document.getElementById("device-prev").disabled = view.offset === 0;
  document.getElementById("device-next").disabled = view.offset + DEVICE_PAGE >= view.total;
  document.getElementById("device-sort").value = view.sort;
}

function sortBy(key) {
  // Problems and quantities read worst/largest first; names and times start ascending.
  const firstDesc = ["problems", "backlog_docs", "backlog_bytes", "oldest_age_s", "online"].includes(key);
  view.order = key === view.sort ? (view.order === "desc" ? "asc" : "desc") : (firstDesc ? "desc" : "asc");
  view.sort = key;
  view.offset = 0;
  guarded(loadDevices);
}

async function loadDocuments() {
  const p = new URLSearchParams({ limit: DOC_PAGE + 1, offset: docs.offset });
  for (const key of ["q", "device", "since", "until"]) if (docs[key]) p.set(key, docs[key]);
  const rows = await api("/api/documents?" + p);
  const more = rows.length > DOC_PAGE;
  const list = el("ol", { id: "documents", class: "results", "data-count": Math.min(rows.length, DOC_PAGE) });
  for (const doc of rows.slice(0, DOC_PAGE)) {
    const title = doc.title ? segments(doc.title) : [doc.filename];
    list.append(el("li", { "data-id": doc.id },
      el("a", { class: "title", href: "/documents/" + doc.id }, ...title),
      el("div", { class: "meta" }, t("doc_from", { device: doc.device }), " · ", t("doc_pages", { pages: doc.pages }),
         " · ", bytes(doc.size), " · ", t("doc_received", { time: whenAgo(doc.received_at) }),
         doc.state === "awaiting_original" ? " · " : null,
         doc.state === "awaiting_original" ? el("span", { class: "badge awaiting" }, t(awaitingKey(doc))) : null),
      doc.snippet ? el("p", { class: "snippet" }, ...segments(doc.snippet)) : null));
  }
  if (!rows.length) list.append(el("li", {}, t("no_documents")));
  document.getElementById("documents").replaceWith(list);
  document.getElementById("doc-order").textContent = docs.q ? t("results_by_relevance") : t("results_newest");
  const shown = Math.min(rows.length, DOC_PAGE);
  document.getElementById("doc-range").textContent = shown
    ? t("range", { from: docs.offset + 1, to: docs.offset + shown, total: more ? "…" : docs.offset + shown }) : t("none");
  document.getElementById("doc-prev").disabled = docs.offset === 0;
  document.getElementById("doc-next").disabled = !more;
}

function field(id, label, attrs) {
  return el("label", { for: id }, label, el("input", { id, ...attrs }));
}

function renderFleetPage(main) {
  const sortOptions = DEVICE_COLUMNS().map((c) => el("option", { value: c.sort }, c.label));
  main.replaceChildren(
    el("h1", {}, t("fleet")),
    el("p", { id: "status", role: "status", "aria-live": "polite" }, t("loading")),
    el("dl", { id: "fleet", class: "stats" }),
    el("h2", { id: "device-heading" }, t("devices", { count: 0 })),
    el("form", { class: "pager", id: "device-filter", onsubmit: (e) => e.preventDefault() },
       el("label", { for: "device-q", class: "visually-hidden" }, t("device_filter")),
       el("input", { id: "device-q", type: "search", placeholder: t("device_filter"), size: 28 }),
       el("button", { type: "button", id: "device-prev", "aria-label": t("prev_label") }, t("prev")),
       el("span", { id: "device-range" }, "…"),
       el("button", { type: "button", id: "device-next", "aria-label": t("next_label") }, t("next"))),
    el("div", { class: "sort-bar" }, el("label", { for: "device-sort" }, t("sort_by", { column: "" }).trim()),
       el("select", { id: "device-sort", onchange: (e) => sortBy(e.target.value) }, ...sortOptions)),
    el("table", { id: "devices" }),
    el("h2", {}, t("documents")),
    el("form", { class: "search", id: "search", role: "search" },
       field("q", t("search_label"), { type: "search", placeholder: t("search_placeholder") }),
       field("doc-device", t("search_device"), { placeholder: t("search_device_placeholder"),
                                                 pattern: "[a-z0-9][a-z0-9\\-]{0,62}" }),
       field("since", t("search_since"), { type: "date" }),
       field("until", t("search_until"), { type: "date" }),
       el("div", { class: "buttons" }, el("button", { id: "search-submit" }, t("search_submit")),
          el("button", { type: "reset", id: "search-reset" }, t("search_clear")))),
    el("div", { class: "pager" }, el("span", { id: "doc-order", class: "muted" }),
       el("button", { type: "button", id: "doc-prev", "aria-label": t("prev_label") }, t("prev")),
       el("span", { id: "doc-range" }, "…"),
       el("button", { type: "button", id: "doc-next", "aria-label": t("next_label") }, t("next"))),
    el("ol", { id: "documents", class: "results" }));
  const form = document.getElementById("search");
  form.onsubmit = (event) => {
    event.preventDefault();
    docs.q = document.getElementById("q").value.trim();
    docs.device = document.getElementById("doc-device").value.trim();
    docs.since = document.getElementById("since").value;
    docs.until = document.getElementById("until").value;
    docs.offset = 0;
    guarded(loadDocuments);
  };
  form.onreset = () => { setTimeout(() => form.requestSubmit(), 0); };
  document.getElementById("doc-prev").onclick = () => { docs.offset = Math.max(0, docs.offset - DOC_PAGE); guarded(loadDocuments); };
  document.getElementById("doc-next").onclick = () => { docs.offset += DOC_PAGE; guarded(loadDocuments); };
  document.getElementById("device-prev").onclick = () => { view.offset = Math.max(0, view.offset - DEVICE_PAGE); guarded(loadDevices); };
  document.getElementById("device-next").onclick = () => { view.offset += DEVICE_PAGE; guarded(loadDevices); };
  let timer = null;
  document.getElementById("device-q").oninput = (event) => {
    // Debounced: one request when the operator pauses typing, not one per key.
    clearTimeout(timer);
    timer = setTimeout(() => { view.q = event.target.value.trim(); view.offset = 0; guarded(loadDevices); }, 250);
  };
}

async function refreshFleet() {
  await guarded(() => Promise.all([loadFleet(), loadDevices(), loadDocuments()]));
}

async function guarded(load) {
  try {
    await load();
    setStatus(t("updated", { time: when(new Date().toISOString()) }));
  } catch (error) {
    setStatus(t("error_loading", { error: String(error.message || error) }), true);
  }
}

// -- a device's page ---------------------------------------------------------------------------------
function chart(history) {
  // 72 hourly columns: bars for documents stored, a line for the backlog reported, grey where silent.
  const w = 720, h = 160, pad = 4, n = history.length, step = (w - 2 * pad) / n;
  const maxBacklog = Math.max(1, ...history.map((p) => p.backlog_docs || 0));
  const maxStored = Math.max(1, ...history.map((p) => p.stored_docs));
  const storedTotal = history.reduce((a, p) => a + p.stored_docs, 0);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  const label = t("chart_label", { max_backlog: maxBacklog === 1 && !history.some((p) => p.backlog_docs) ? 0 : maxBacklog,
                                   stored: storedTotal });
  svg.setAttribute("aria-label", label);
  const title = document.createElementNS(ns, "title");
  title.textContent = label;
  svg.append(title);
  const add = (tag, attrs) => { const node = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v); svg.append(node); return node; };
  const points = [];
  history.forEach((p, i) => {
    const x = pad + i * step;
    if (p.backlog_docs === null) add("rect", { x, y: pad, width: step, height: h - 2 * pad, fill: "#eee" });
    if (p.stored_docs) {
      const bh = (h - 2 * pad) * p.stored_docs / maxStored;
      add("rect", { x: x + step * 0.15, y: h - pad - bh, width: step * 0.7, height: bh, fill: "#3a7bd5" });
    }
    if (p.backlog_docs !== null) points.push(`${x + step / 2},${h - pad - (h - 2 * pad) * p.backlog_docs / maxBacklog}`);
  });
  if (points.length) add("polyline", { points: points.join(" "), fill: "none", stroke: "#a00000", "stroke-width": 2 });
  return el("figure", { class: "chart" }, svg,
    el("figcaption", { class: "legend" }, el("span", { class: "l-backlog" }, t("chart_backlog")),
       el("span", { class: "l-stored" }, t("chart_stored")), el("span", { class: "l-gap" }, t("chart_gap"))));
}

function facts(pairs) {
  const list = el("dl", { class: "facts" });
  for (const [label, value, attrs] of pairs) {
    const dd = el("dd", attrs || {});
    if (value instanceof Node) dd.append(value); else dd.textContent = value === null || value === undefined || value === "" ? t("dash") : String(value);
    list.append(el("dt", {}, label), dd);
  }
  return list;
}

async function renderDevicePage(main, id) {
  const response = await call("/api/devices/" + encodeURIComponent(id));
  if (response.status === 404 || response.status === 400) { main.replaceChildren(el("h1", {}, t("not_found"))); return; }
  if (!response.ok) throw new Error("HTTP " + response.status);
  const d = await response.json();
  const hl = d.health || {};
  document.title = t("device_title", { id: d.id }) + " — sohoa";
  const alarms = (hl.alarms || []).length ? el("ul", { class: "alarms", id: "alarms" }, ...hl.alarms.map((a) => el("li", {}, a)))
    : el("p", { id: "alarms", class: "muted" }, t("no_alarms"));
  fill(main,
    el("p", {}, el("a", { href: "/" }, t("back_to_fleet"))),
    el("h1", {}, t("device_title", { id: d.id })),
    el("p", { id: "status", role: "status", "aria-live": "polite" }),
    d.possible_clone ? el("p", {}, cloneBadge(d.possible_clone)) : null,
    el("h2", {}, t("health")),
    facts([[t("h_state"), stateCell(d), { id: "device-state" }],
           [t("h_last_seen"), whenAgo(d.last_seen)],
           [t("h_backlog"), number(d.backlog_docs) + " · " + bytes(d.backlog_bytes)],
           [t("h_oldest"), d.backlog_docs ? duration(d.oldest_age_s) : ""],
           [t("h_last_receipt"), whenAgo(d.last_receipt)],
           [t("h_documents"), number(d.documents_total)],
           [t("h_awaiting"), d.documents_awaiting_original ? number(d.documents_awaiting_original) : ""],
           [t("h_replaces"), d.replaces ? el("a", { href: "/devices/" + encodeURIComponent(d.replaces) }, d.replaces) : ""],
           [t("h_replaced_by"), d.replaced_by ? el("a", { href: "/devices/" + encodeURIComponent(d.replaced_by) }, d.replaced_by) : ""],
           [t("h_disk_free"), hl.disk_free_bytes === undefined ? "" : bytes(hl.disk_free_bytes), { id: "disk-free" }],
           [t("h_failed"), hl.failed_docs === undefined ? "" : number(hl.failed_docs)],
           [t("h_version"), hl.version],
           [t("h_status_time"), hl.updated_at ? whenAgo(hl.updated_at) : ""],
           [t("h_enrolled"), when(d.enrolled_at)],
           [t("h_last_error"), d.last_error, { class: d.last_error ? "bad" : null }]]),
    el("h2", {}, t("alarms")), alarms,
    el("h2", {}, t("history")), chart(d.history),
    el("h2", {}, t("recent_documents")),
    table([{ label: t("m_filename") }, { label: t("m_pages"), num: true }, { label: t("m_size"), num: true },
           { label: t("m_received") }],
          d.recent_documents.map((doc) => [el("a", { href: "/documents/" + doc.id }, doc.filename), number(doc.pages),
                                           bytes(doc.size), whenAgo(doc.received_at)]), t("recent_documents")),
    el("h2", {}, t("recent_errors")),
    d.recent_errors.length ? table([{ label: t("f_at") }, { label: t("f_event") }, { label: t("h_last_error") }],
      d.recent_errors.map((e) => [whenAgo(e.at), e.error_class, e.error]), t("recent_errors"))
      : el("p", { class: "muted" }, t("no_errors")));
  setStatus(t("updated", { time: when(new Date().toISOString()) }));
}

// -- a document's page --------------------------------------------------------------------------------
async function renderDocumentPage(main, id) {
  const response = await call("/api/documents/" + encodeURIComponent(id));
  if (response.status === 404 || response.status === 400) { main.replaceChildren(el("h1", {}, t("not_found"))); return; }
  if (!response.ok) throw new Error("HTTP " + response.status);
  const doc = await response.json();
  document.title = doc.filename + " — sohoa";
  const sent = doc.package_metadata || {};   // what the edge sent; doc.metadata: the six record fields
  const ocr = sent.ocr ? [sent.ocr.engine, (sent.ocr.languages || []).join("+"),
                          sent.ocr.dpi ? sent.ocr.dpi + " dpi" : null].filter(Boolean).join(", ") : "";
  const fields = Object.entries(doc.metadata || {}).map(([name, f]) =>
    [t("af_" + name), f.value === null || f.value === undefined ? null
      : f.value + (f.source ? " (" + t("source_" + f.source) + ")" : "")]);
  const archival = doc.archival ? t("archival_" + doc.archival.state) : null;
  // Catalogued from the text the box sent ahead: searchable, but no original (no preview, no download) yet.
  const awaiting = doc.state === "awaiting_original";
  let preview = el("p", { class: "muted", id: "preview" }, t(awaitingKey(doc)));
  if (!awaiting) {
    const image = el("img", { class: "preview", id: "preview", src: "/api/documents/" + doc.id + "/preview",
                              alt: t("preview_alt", { name: doc.filename }), width: 700, height: 990 });
    image.onerror = () => image.replaceWith(el("p", { class: "muted", id: "preview" }, t("no_preview")));
    image.onload = () => { image.removeAttribute("width"); image.removeAttribute("height"); };
    preview = image;
  }
  const download = awaiting
    ? el("p", { id: "awaiting", class: "notice" }, el("span", { class: "badge awaiting" }, t(awaitingKey(doc))), " ",
         t(awaitingKey(doc) + "_note"))
    : doc.can_download
    ? el("p", {}, el("a", { class: "button", id: "download", href: "/api/documents/" + doc.id + "/original", download: doc.filename },
                     t("download")), " ", el("small", { class: "muted" }, t("download_note")))
    : el("p", { class: "muted", id: "no-download" }, t("download_forbidden"));
  const events = (doc.fixity || []).map((f) => [whenAgo(f.at), t("event_" + f.event),
    el("span", { class: "hash" }, f.original_sha256 || t("dash")), el("span", { class: "hash" }, f.package_sha256 || t("dash"))]);
  fill(main,
    el("p", {}, el("a", { href: "/" }, t("back_to_fleet"))),
    el("h1", {}, doc.filename),
    el("p", { id: "status", role: "status", "aria-live": "polite", class: "muted" }, t("document_title", { id: doc.id })),
    download,
    el("div", { class: "doc-grid" },
       el("section", { "aria-labelledby": "h-preview" }, el("h2", { id: "h-preview" }, t("preview")), preview),
       el("section", { "aria-labelledby": "h-meta" }, el("h2", { id: "h-meta" }, t("metadata")),
          facts([[t("m_filename"), doc.filename], [t("m_device"), deviceLink(doc.device)],
                 [t("m_pages"), number(doc.pages)], [t("m_size"), bytes(doc.size) + " (" + number(doc.size) + " byte)"],
                 [t("m_media_type"), doc.media_type], [t("m_captured"), whenAgo(doc.captured_at)],
                 [t("m_received"), whenAgo(doc.received_at)],
                 [t("m_sha256"), el("span", { class: "hash", id: "sha256" }, doc.sha256)],
                 [t("m_package"), el("span", { class: "hash" }, doc.package_sha256)],
                 [t("m_tid"), el("span", { class: "hash" }, doc.tid)], [t("m_seq"), doc.seq], [t("m_ocr"), ocr],
                 [t("archival_copy"), archival]]),
          fields.length ? el("h3", {}, t("archival_fields")) : null,
          fields.length ? facts(fields) : null,
          doc.same_content.length ? el("p", {}, t("same_content") + ": ",
            ...doc.same_content.flatMap((other, i) => [i ? ", " : "", el("a", { href: "/documents/" + other }, "#" + other)])) : null)),
    el("h2", {}, t("ocr_text")),
    el("pre", { class: "ocr", id: "ocr-text", tabindex: 0 }, doc.text.trim() ? doc.text : t("no_text")),
    el("h2", {}, t("fixity")),
    table([{ label: t("f_at") }, { label: t("f_event") }, { label: t("f_original") }, { label: t("f_package") }], events, t("fixity")));
}

// -- start ----------------------------------------------------------------------------------------------
async function startDashboard() {
  session = await api("/api/session");
  document.getElementById("who").textContent = t("signed_in_as", { name: session.operator, role: t("role_" + session.role) });
  document.getElementById("logout").onclick = async () => { await api("/logout", "POST"); location.href = "/"; };
  const main = document.getElementById("main");
  const path = location.pathname;
  const device = path.match(/^\/devices\/([^/]+)$/);
  const docMatch = path.match(/^\/documents\/([0-9]+)$/);
  if (device) await renderDevicePage(main, decodeURIComponent(device[1]));
  else if (docMatch) await renderDocumentPage(main, docMatch[1]);
  else {
    document.title = t("app_title");
    renderFleetPage(main);
    await refreshFleet();
    setInterval(refreshFleet, 15000);
  }
}

function startLogin() {
  document.title = t("login_title") + " — sohoa";
  // JSON only: the server refuses form posts to /login, so another site cannot sign you in as someone else.
  document.getElementById("login").onsubmit = async (event) => {
    event.preventDefault();
    const response = await fetch("/login", {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: document.getElementById("name").value,
                             password: document.getElementById("password").value }),
    });
    if (response.ok) { location.reload(); return; }
    document.getElementById("error").textContent = response.status === 429 ? t("login_throttled") : t("login_wrong");
  };
}

async function start() {
  S = await (await fetch("/static/i18n/" + lang + ".json", { credentials: "same-origin" })).json();
  translateStatic();
  if (document.body.dataset.page === "login") startLogin();
  else await startDashboard().catch((error) => setStatus(t("error_loading", { error: String(error.message || error) }), true));
}

start();
