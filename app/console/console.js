// privface admin console: a small static app over the gateway's JSON admin API (app/routers/admin*.py).
//
// Safety rules of this file (tests/test_console.py checks them):
// - every value from the server is put into the page with textContent / element properties, never parsed as
//   HTML (no innerHTML, outerHTML, insertAdjacentHTML, document.write, eval): tenant names, job params and
//   messages are user-provided strings;
// - the API key lives in sessionStorage (this tab only) and travels as an Authorization header, never as a
//   cookie, so another site cannot make the browser send it (no CSRF), and the page's CSP allows only this
//   file as script.
"use strict";

const KEY_STORAGE = "privface-admin-key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const state = { tab: "models", openJobs: new Set(), auditBefore: null, timer: null, tick: 0 };

function $(id) { return document.getElementById(id); }

// el("td", {className: "x", dataset: {job: id}}, "text", childNode): text children become text nodes.
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else node[name] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows));
}

function when(stamp) { return stamp ? stamp.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "Z") : "—"; }
function num(value, digits = 3) { return typeof value === "number" ? value.toFixed(digits) : "—"; }

function flash(message, isError) {
  const node = $("flash");
  node.textContent = message;
  node.className = isError ? "error" : "ok";
}

class ApiError extends Error {
  constructor(status, problem) {
    super(problem && problem.title ? `${problem.title}: ${problem.detail || ""}` : `HTTP ${status}`);
    this.status = status;
  }
}

async function api(method, path, body, key) {
  const headers = { Authorization: "Bearer " + (key || sessionStorage.getItem(KEY_STORAGE) || "") };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                       credentials: "omit", cache: "no-store" });
  const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (response.status === 401 && !key) {
    logout("The key is no longer valid (revoked or rotated): log in again.");
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Run an action from a button or form: show its outcome, refresh the current tab.
async function act(what, action) {
  try {
    const result = await action();
    flash(what + ": done");
    await refresh();
    return result;
  } catch (error) {
    flash(what + " failed — " + error.message, true);
    return null;
  }
}

// -- login ---------------------------------------------------------------------------------------------------

async function login(key) {
  try {
    const tenant = await api("GET", "/v1/admin/tenant", undefined, key);
    sessionStorage.setItem(KEY_STORAGE, key);
    $("login").hidden = true;
    $("console").hidden = false;
    $("logout").hidden = false;
    $("who").textContent = `tenant ${tenant.id} (${tenant.name}) · key pf_${key.split("_")[1]}_…`;
    await loadJobKinds();
    show(state.tab);
    clearInterval(state.timer);
    state.timer = setInterval(poll, 1000);
  } catch (error) {
    sessionStorage.removeItem(KEY_STORAGE);
    $("login-error").textContent = error.status === 403 ? "Refused: this key has no admin scope."
      : error.status === 401 ? "Refused: the key is unknown, revoked or malformed." : error.message;
  }
}

function logout(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  clearInterval(state.timer);
  $("console").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("who").textContent = "";
  $("login-key").value = "";
  $("login-error").textContent = message || "";
}

// -- tabs ----------------------------------------------------------------------------------------------------

function show(tab) {
  state.tab = tab;
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== "tab-" + tab;
  for (const button of document.querySelectorAll("nav button")) {
    button.classList.toggle("active", button.dataset.tab === tab);
  }
  flash("");
  refresh();
}

async function refresh() {
  const loaders = { models: loadModels, jobs: loadJobs, tenant: loadTenant, audit: () => loadAudit(true),
                    parties: loadParties };
  try {
    await loaders[state.tab]();
  } catch (error) {
    flash("Loading failed — " + error.message, true);
  }
}

function poll() {
  state.tick += 1;
  if (state.tab === "jobs" || (state.tab === "parties" && state.tick % 5 === 0)) refresh();
}

// -- models --------------------------------------------------------------------------------------------------

function metricSummary(metrics) {
  const heldout = (metrics && metrics.heldout) || {};
  const far = (heldout.tar_at_far || {})["0.001"] || {};
  return `accuracy ${num((heldout.verification || {}).accuracy)} · TAR@FAR1e-3 ${num(far.tar)} · ` +
         `rank-1 ${num(heldout.rank1)}`;
}

async function loadModels() {
  const models = await api("GET", "/v1/admin/models");
  const presets = [...new Set(models.map((m) => m.preset))].sort();
  const box = $("models");
  box.replaceChildren();
  for (const preset of presets) {
    const rows = models.filter((m) => m.preset === preset).map((m) => el("tr", { dataset: { version: m.version } },
      el("td", {}, m.version), el("td", { className: "status-" + m.status }, m.status),
      el("td", {}, m.transform_id), el("td", {}, num(m.threshold)),
      el("td", {}, metricSummary(m.metrics),
         el("details", {}, el("summary", {}, "all metrics"), el("pre", {}, JSON.stringify(m.metrics, null, 1)))),
      el("td", {}, when(m.created_at)), el("td", {}, when(m.activated_at)),
      el("td", {}, m.status === "active" ? "" : el("button", {
        type: "button", className: "activate", onclick: () => act(`Activate ${m.version}`,
          () => api("POST", `/v1/admin/models/${encodeURIComponent(m.version)}/activate`)) }, "Activate"))));
    box.append(el("h3", {}, `Preset ${preset}`), table(
      ["Version", "Status", "Transform", "Threshold", "Held-out metrics", "Created", "Activated", ""], rows));
  }
  if (!models.length) box.append(el("p", {}, "No model version is registered."));
}

// -- jobs ----------------------------------------------------------------------------------------------------

async function loadJobKinds() {
  const spec = await (await fetch("/openapi.json")).json();
  const kinds = spec.components.schemas.JobCreate.properties.kind.enum || [];
  $("job-kind").replaceChildren(...kinds.map((kind) => el("option", { value: kind }, kind)));
}

function roundsTable(rounds) {
  return table(["Round", "Sampled", "Finished", "Failed", "Loss", "Held-out accuracy", "Train s"],
    rounds.map((r) => el("tr", {}, el("td", {}, `${r.round} of ${r.of}`), el("td", {}, r.sampled ?? "—"),
      el("td", {}, r.finished ?? "—"), el("td", {}, r.failed ?? "—"), el("td", {}, num((r.metrics || {}).loss, 4)),
      el("td", {}, num((r.heldout || {}).accuracy)), el("td", {}, num(r.train_seconds, 1)))));
}

function jobDetails(job) {
  const details = el("details", { open: state.openJobs.has(job.id) }, el("summary", {}, "params and result"),
    el("pre", {}, "params " + JSON.stringify(job.params ?? {}, null, 1)),
    el("pre", {}, "result " + JSON.stringify(job.result, null, 1)));
  details.addEventListener("toggle", () => {
    if (details.open) state.openJobs.add(job.id); else state.openJobs.delete(job.id);
  });
  return details;
}

async function loadJobs() {
  const jobs = await api("GET", "/v1/admin/jobs?limit=50");
  const rows = [];
  for (const job of jobs) {
    const cancellable = !TERMINAL.has(job.status) && job.status !== "cancelling";
    rows.push(el("tr", { dataset: { job: job.id, status: job.status } },
      el("td", {}, job.id), el("td", {}, job.kind), el("td", { className: "status-" + job.status }, job.status),
      el("td", {}, el("progress", { max: 1, value: job.progress }), ` ${Math.round(job.progress * 100)}%`),
      el("td", { className: "message" }, job.message ?? "", jobDetails(job)),
      el("td", {}, when(job.created_at)), el("td", {}, when(job.updated_at)),
      el("td", {}, cancellable ? el("button", { type: "button", className: "cancel", onclick: () => act(
        `Cancel ${job.id}`, () => api("POST", `/v1/admin/jobs/${encodeURIComponent(job.id)}/cancel`)) }, "Cancel")
        : "")));
    const rounds = job.result && Array.isArray(job.result.rounds) ? job.result.rounds : [];
    if (rounds.length) {
      rows.push(el("tr", { className: "rounds" }, el("td", { colSpan: 8 }, el("strong", {}, "Federated rounds"),
        roundsTable(rounds))));
    }
  }
  $("jobs").replaceChildren(jobs.length ? table(
    ["Id", "Kind", "Status", "Progress", "Message", "Created", "Updated", ""], rows) : el("p", {}, "No job yet."));
}

async function startJob(event) {
  event.preventDefault();
  let params;
  try {
    params = JSON.parse($("job-params").value || "{}");
  } catch (error) {
    flash("Params are not valid JSON — " + error.message, true);
    return;
  }
  await act(`Start ${$("job-kind").value}`, () => api("POST", "/v1/admin/jobs", { kind: $("job-kind").value, params }));
}

// -- tenant and keys -----------------------------------------------------------------------------------------

function definitions(list, pairs) {
  list.replaceChildren(...pairs.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value ?? "—")]));
}

function showNewKey(created) {
  $("new-key").hidden = false;
  $("new-key-value").value = created.api_key;
}

async function loadTenant() {
  const [tenant, keys] = await Promise.all([api("GET", "/v1/admin/tenant"), api("GET", "/v1/admin/keys")]);
  definitions($("tenant"), [["Id", tenant.id], ["Name", tenant.name], ["Privacy preset", tenant.preset ?? "default"],
    ["Template key version", tenant.key_version], ["ε ceiling", tenant.epsilon_max ?? "none"],
    ["Created", when(tenant.created_at)]]);
  if (tenant.preset) $("preset").value = tenant.preset;
  const rows = keys.map((k) => el("tr", { dataset: { prefix: k.prefix } },
    el("td", {}, `pf_${k.prefix}_…`), el("td", {}, k.scopes.join(" ")), el("td", {}, when(k.created_at)),
    el("td", {}, k.revoked_at ? "revoked " + when(k.revoked_at) : "active"),
    el("td", {}, k.revoked_at ? "" : el("span", {},
      el("button", { type: "button", className: "revoke", onclick: () => act(`Revoke ${k.prefix}`,
        () => api("POST", `/v1/admin/keys/${encodeURIComponent(k.prefix)}/revoke`)) }, "Revoke"), " ",
      el("button", { type: "button", className: "rotate", onclick: async () => {
        const created = await act(`Rotate ${k.prefix}`,
          () => api("POST", `/v1/admin/keys/${encodeURIComponent(k.prefix)}/rotate`));
        if (created) showNewKey(created);
      } }, "Rotate")))));
  $("keys").replaceChildren(table(["Key", "Scopes", "Created", "State", ""], rows));
}

async function createKey(event) {
  event.preventDefault();
  const scopes = [...document.querySelectorAll("#key-form input[name=scope]:checked")].map((box) => box.value);
  const created = await act("Create key", () => api("POST", "/v1/admin/keys", { scopes }));
  if (created) showNewKey(created);
}

async function createTenant(event) {
  event.preventDefault();
  const created = await act("Create tenant", () => api("POST", "/v1/admin/tenants",
    { id: $("tenant-id").value, name: $("tenant-name").value }));
  if (created) {
    $("new-tenant").hidden = false;
    definitions($("new-tenant"), [["Tenant", created.tenant.id], ["Name", created.tenant.name],
      ["Admin key (shown once)", created.admin_key]]);
  }
}

async function setPreset(event) {
  event.preventDefault();
  await act("Set preset", () => api("PUT", "/v1/admin/tenant/preset", { preset: $("preset").value }));
}

async function rotateTemplateKey(event) {
  event.preventDefault();
  await act("Rotate the template key", () => api("POST", "/v1/admin/tenant/rotate-key"));
  $("rotate-template-confirm").checked = false;
}

// -- audit log and party health ------------------------------------------------------------------------------

async function loadAudit(first) {
  if (first) state.auditBefore = null;
  const query = state.auditBefore ? `&before_id=${state.auditBefore}` : "";
  const entries = await api("GET", "/v1/admin/audit?limit=50" + query);
  const rows = entries.map((e) => el("tr", {}, el("td", {}, when(e.at)), el("td", {}, e.action),
    el("td", {}, e.outcome), el("td", {}, e.key_prefix ?? "—"), el("td", {}, e.subject_id ?? "—"),
    el("td", {}, e.request_id ?? "—")));
  if (first) $("audit").replaceChildren(table(["At", "Action", "Outcome", "Key", "Subject", "Request id"], []));
  $("audit").querySelector("tbody").append(...rows);
  if (entries.length) state.auditBefore = entries[entries.length - 1].id;
  $("audit-more").hidden = entries.length < 50;
}

function check(ok) { return el("span", { className: ok ? "ok" : "error" }, ok ? "ok" : "down"); }

function partyFacts(s) {
  const mpc = s.mpc || {};
  return el("span", {}, `MPC generation ${mpc.generation ?? "—"} (${mpc.provider || "—"}) · applied through op ` +
    `${s.applied_through ?? "—"} · ${(s.pending || []).length} pending · last error ${mpc.last_error || "none"}`,
    el("details", {}, el("summary", {}, "full state"), el("pre", {}, JSON.stringify(s, null, 1))));
}

async function loadParties() {
  const response = await fetch("/readyz", { cache: "no-store" });
  const ready = await response.json();
  const checks = ready.checks || {};
  const parties = checks.parties || {};
  const states = parties.states || [null, null];
  const rows = states.map((s, rank) => el("tr", { dataset: { party: rank } }, el("td", {}, `party ${rank}`),
    el("td", {}, check(s !== null)), el("td", {}, check(Boolean(s && s.mpc && s.mpc.connected))),
    el("td", {}, s === null ? (parties.error || "no answer") : partyFacts(s))));
  const model = checks.model || {};
  $("parties").replaceChildren(
    el("p", {}, `Gateway: ${ready.status} · database `, check((checks.database || {}).ok),
       ` · jobs backend ${(checks.jobs || {}).backend || "—"}`),
    table(["Party", "Reachable", "MPC connected", "State"], rows),
    el("p", {}, `Served model versions: ${Object.entries(model.presets || {}).map(([p, v]) => `${p} → ${v}`)
      .join(", ") || "none"} (default preset ${model.default_preset || "—"}; providers ` +
      `${(model.providers || []).join(", ") || "—"})`));
}

// -- wiring --------------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => { event.preventDefault(); login($("login-key").value.trim()); });
  $("logout").addEventListener("click", () => logout(""));
  for (const button of document.querySelectorAll("nav button")) {
    button.addEventListener("click", () => show(button.dataset.tab));
  }
  $("job-form").addEventListener("submit", startJob);
  $("key-form").addEventListener("submit", createKey);
  $("tenant-form").addEventListener("submit", createTenant);
  $("preset-form").addEventListener("submit", setPreset);
  $("rotate-template-form").addEventListener("submit", rotateTemplateKey);
  $("audit-more").addEventListener("click", () => loadAudit(false).catch((error) => flash(error.message, true)));
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) login(saved);
});
