// The Cogbert console: reads the operator API with the token the user typed, renders it, and
// sends pause/resume/abort after a confirmation. No framework, no build step: data is always
// put into the page as text (textContent), never as HTML.
"use strict";

const TOKEN_KEY = "cogbert.token";
const REFRESH_MS = 2000;
let role = null;
let timer = null;
let state = { devices: [], releases: [], rollouts: { current: null, history: [] }, audit: [] };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "title") e.title = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function badge(text) {
  return el("span", { class: "state " + String(text).replace(/[^a-z_]/g, "") }, text);
}

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

function when(t) {
  if (!t) return "";
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function fmt(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(4);
  if (Array.isArray(v) && v.length === 0) return "none";
  if (Array.isArray(v)) return v.length > 6 ? `${v.slice(0, 6).map(fmt).join(", ")} … (${v.length})` : v.map(fmt).join(", ");
  if (v && typeof v === "object") return Object.entries(v).map(([k, x]) => `${k}=${fmt(x)}`).join(" ");
  return v === null || v === undefined ? "" : String(v);
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const opts = { method, headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401) { signOut("the token was refused (401): sign in again"); throw new Error("unauthorized"); }
  if (!r.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : r.statusText;
    throw new Error(`${r.status}: ${detail}`);
  }
  return data;
}

// -- sign in and out ---------------------------------------------------------------------------

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    role = (await api("GET", "/v1/whoami")).role;
  } catch (e) {
    if (e.message !== "unauthorized") signOut(String(e.message));
    return;
  }
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("who").hidden = false;
  $("role").textContent = `signed in: ${role}`;
  $("role").dataset.role = role;
  show(location.hash.slice(1) || "fleet");
  await refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  role = null;
  if (timer) clearInterval(timer);
  timer = null;
  for (const s of document.querySelectorAll("section.tab")) s.hidden = true;
  $("tabs").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").value = "";
}

function show(tab) {
  if (!["fleet", "releases", "rollout", "audit"].includes(tab)) tab = "fleet";
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== tab;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === tab);
  history.replaceState(null, "", `#${tab}`);
}

// -- data --------------------------------------------------------------------------------------

async function refresh() {
  try {
    const [devices, releases, rollouts, audit] = await Promise.all([
      api("GET", "/v1/devices"), api("GET", "/v1/releases"), api("GET", "/v1/rollouts"), api("GET", "/v1/audit?limit=200"),
    ]);
    state = { devices, releases, rollouts, audit };
    renderFleet();
    renderReleases();
    renderRollout();
    renderAudit();
    $("status-line").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
  } catch (e) {
    if (e.message !== "unauthorized") $("status-line").textContent = `could not update: ${e.message}`;
  }
}

function renderFleet() {
  const now = Date.now() / 1000;
  const q = $("device-filter").value.trim().toLowerCase();
  const silentOnly = $("only-silent").checked;
  const rows = state.devices.filter((d) => {
    if (silentOnly && d.last_seen && now - d.last_seen < 60) return false;
    if (!q) return true;
    const hay = [d.device, d.release, d.model, d.last_status, ...(d.tags || [])].join(" ").toLowerCase();
    return hay.includes(q);
  });
  const reporting = state.devices.filter((d) => d.last_seen && now - d.last_seen < 60).length;
  const pending = state.devices.reduce((a, d) => a + (d.outbox_pending || 0), 0);
  $("fleet-summary").replaceChildren(
    el("div", { id: "count-devices" }, el("b", {}, state.devices.length), "devices"),
    el("div", { id: "count-reporting" }, el("b", {}, reporting), "reporting (60 s)"),
    el("div", { id: "count-pending" }, el("b", {}, pending), "records waiting on devices"),
  );
  const body = $("devices").tBodies[0];
  body.replaceChildren(...rows.map((d) => {
    const t = d.telemetry || {};
    const silent = !d.last_seen || now - d.last_seen >= 60;
    return el("tr", { "data-device": d.device },
      el("td", {}, d.device), el("td", {}, (d.tags || []).join(", ")), el("td", { class: "num" }, d.release ?? ""),
      el("td", {}, d.model ?? ""), el("td", { class: silent ? "silent" : "" }, ago(d.last_seen)),
      el("td", { class: "num" }, d.outbox_pending ?? ""),
      el("td", { class: "num" }, t.latency_p95_us != null ? `${t.latency_p95_us.toFixed(0)} µs` : ""),
      el("td", { class: "num" }, t.decisions ?? ""), el("td", { class: "num" }, t.errors ?? ""),
      el("td", { class: "num" }, t.nonfinite ?? ""), el("td", {}, d.last_status ? badge(d.last_status.split(":")[0]) : "",
        d.last_status && d.last_status.includes(":") ? ` ${d.last_status.split(":").slice(1).join(":")}` : ""));
  }));
}

function renderReleases() {
  const body = $("release-table").tBodies[0];
  const rows = [...state.releases].sort((a, b) => b.counter - a.counter);
  body.replaceChildren(...rows.map((r) => {
    const lineage = [r.parent_release ? `from release ${r.parent_release}` : "", r.parent_model ? `parent ${r.parent_model}` : ""]
      .filter(Boolean).join("; ");
    const hist = (r.history || []).map((h) => `${h.state}${h.reason ? ` (${h.reason})` : ""}`).join(" → ");
    return el("tr", { "data-release": r.counter },
      el("td", { class: "num" }, r.counter), el("td", {}, badge(r.state)), el("td", {}, r.model_id || ""),
      el("td", {}, lineage), el("td", {}, r.quant || ""), el("td", {}, r.created || ""),
      el("td", { class: "metrics" }, fmt(r.evaluation || {})), el("td", { class: "metrics" }, hist));
  }));
}

function renderRollout() {
  const cur = state.rollouts.current;
  const box = $("rollout-current");
  if (!cur) {
    box.replaceChildren(el("p", { id: "no-rollout", class: "muted" }, "No rollout has run since the service started."));
  } else {
    const dl = el("dl", { id: "rollout-summary" });
    const add = (k, v) => dl.append(el("dt", {}, k), el("dd", {}, v));
    add("candidate", `release ${cur.candidate}`);
    add("stable", cur.stable != null ? `release ${cur.stable}` : "none");
    add("state", badge(cur.state));
    add("stage", `${cur.stage}${cur.timeline && cur.timeline.length ? "" : " (no stage analysed yet)"}`);
    add("started", `${when(cur.started)} (${ago(cur.started)})`);
    add("offered to", `${Object.keys(cur.offered || {}).length} devices${cur.tag ? ` tagged ${cur.tag}` : ""}`);
    if (cur.settings) {
      const t = cur.settings;
      add("abort on", `install failures > ${fmt(t.max_install_failure_rate)}, errors > ${fmt(t.max_error_rate)}, ` +
        `NaN > ${fmt(t.max_nan_rate)}, latency > ${fmt(t.latency_factor)}× control + ${fmt(t.latency_slack_us)} µs, ` +
        `reward p < ${fmt(t.reward_alpha)}; stages ${fmt(t.stages)} %, ${fmt(t.stage_seconds)} s each`);
    }
    if (cur.result) add("result", badge(cur.result));
    if (cur.reasons && cur.reasons.length) add("reasons", cur.reasons.join("; "));
    box.replaceChildren(el("h2", {}, `Rollout of release ${cur.candidate}`), dl);
  }
  const active = cur && (cur.state === "running" || cur.state === "paused");
  const operate = role === "operate";
  $("pause").disabled = !(operate && cur && cur.state === "running");
  $("resume").disabled = !(operate && cur && cur.state === "paused");
  $("abort").disabled = !(operate && active);
  for (const id of ["pause", "resume", "abort"]) $(id).title = operate ? "" : "needs an operate token";

  const stages = (cur && cur.timeline) || [];
  $("timeline").replaceChildren(...(stages.length ? [] : [el("li", { class: "muted" }, "no stage analysed yet")]), ...stages.map((s) =>
    el("li", { "data-stage": s.stage }, badge(s.verdict), ` stage ${s.stage} (${s.pct} %) at ${when(s.time)}`,
      s.reasons && s.reasons.length ? el("div", { class: "error" }, s.reasons.join("; ")) : null,
      el("div", { class: "metrics" }, fmt(s.metrics)))));

  const byDevice = Object.fromEntries(state.devices.map((d) => [d.device, d]));
  $("cohort").tBodies[0].replaceChildren(...Object.entries((cur && cur.offered) || {}).map(([dev, t]) => {
    const d = byDevice[dev] || {};
    return el("tr", {}, el("td", {}, dev), el("td", {}, ago(t)), el("td", { class: "num" }, d.release ?? ""),
      el("td", {}, d.last_status ? badge(d.last_status.split(":")[0]) : ""));
  }));
  $("history").tBodies[0].replaceChildren(...[...(state.rollouts.history || [])].reverse().map((h) =>
    el("tr", {}, el("td", {}, h.candidate), el("td", {}, h.stable ?? ""), el("td", {}, when(h.started)),
      el("td", {}, badge(h.result || h.state)), el("td", {}, (h.reasons || []).join("; ")))));
}

function renderAudit() {
  $("audit-table").tBodies[0].replaceChildren(...state.audit.map((a) => {
    const { time, time_s, event, actor, counter, candidate, ...rest } = a;
    return el("tr", { "data-event": event }, el("td", {}, time || when(time_s)), el("td", {}, event), el("td", {}, actor || ""),
      el("td", { class: "num" }, counter ?? candidate ?? ""), el("td", { class: "metrics" }, fmt(rest)));
  }));
}

// -- actions -----------------------------------------------------------------------------------

function confirmAction(text, withReason) {
  return new Promise((resolve) => {
    const dlg = $("confirm");
    $("confirm-text").textContent = text;
    $("confirm-reason-row").hidden = !withReason;
    dlg.returnValue = "";
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok" ? $("confirm-reason").value : null), { once: true });
    dlg.showModal();
  });
}

async function act(action) {
  const cur = state.rollouts.current;
  if (!cur) return;
  const text = {
    pause: `Pause the rollout of release ${cur.candidate}? Devices that have it keep it; no new offers go out.`,
    resume: `Resume the rollout of release ${cur.candidate}? The current stage starts its analysis again.`,
    abort: `Abort the rollout of release ${cur.candidate} and send every device the stable release ${cur.stable ?? ""} again?`,
  }[action];
  const reason = await confirmAction(text, action === "abort");
  if (reason === null) return;
  try {
    const r = await api("POST", `/v1/rollouts/current/${action}`, action === "abort" ? { reason } : undefined);
    $("action-result").textContent = `${action}: the rollout is now ${r.state}`;
  } catch (e) {
    $("action-result").textContent = `${action} failed: ${e.message}`;
  }
  await refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    $("login-error").textContent = "";
    signIn($("token").value.trim());
  });
  $("logout").addEventListener("click", () => signOut(""));
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.tab));
  $("device-filter").addEventListener("input", renderFleet);
  $("only-silent").addEventListener("change", renderFleet);
  for (const a of ["pause", "resume", "abort"]) $(a).addEventListener("click", () => act(a));
  // "#tab=rollout&token=..." signs in without typing (the demo's screenshot uses it): the token
  // is moved into sessionStorage and out of the URL at once. Fragments never reach the server.
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("token")) {
    sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    history.replaceState(null, "", `#${params.get("tab") || "fleet"}`);
  }
  if (sessionStorage.getItem(TOKEN_KEY)) signIn(sessionStorage.getItem(TOKEN_KEY));
});
