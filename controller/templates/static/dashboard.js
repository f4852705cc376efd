// tgfleet dashboard: plain JS, no build step. The page came with its data (#boot);
// it stays live over the API's server-sent events (/api/v1/events) and re-reads the
// bots on every event and every few seconds (CPU and memory change without events).
// Everything is read with the session cookie; writes carry the CSRF token.
"use strict";

const boot = JSON.parse(document.getElementById("boot").textContent);
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const canOperate = document.body.dataset.canOperate === "true";
const page = document.body.dataset.page;
const REFRESH_MS = 5000;

// Per-bot readings the API may carry (issue #12's resource tracking): where each is
// in a bot's view, paths tried in order, a number at the end scales it (bytes → MB).
// One the view lacks shows "-".
const MB = 1 / 1048576;
const FIGURES = {
  cpu_percent: [["resources", "cpu_percent"]],
  pss_mb: [["resources", "pss_bytes", MB]],
  data_mb: [["resources", "data_bytes", MB]],
  data_limit_mb: [["resources", "data_limit_bytes", MB]],
  open_fds: [["resources", "open_files"]],
  fd_limit: [["resources", "open_files_limit"]],
  threads: [["resources", "threads"]],
  messages_in: [["messages", "received"]],
  messages_out: [["messages", "sent"]],
  handler_errors: [["messages", "handler_errors"]],
};

function figure(bot, name) {
  for (const path of FIGURES[name]) {
    let value = bot;
    let factor = 1;
    for (const step of path) {
      if (typeof step === "number") factor = step;
      else value = value && typeof value === "object" ? value[step] : undefined;
    }
    if (typeof value === "number") return value * factor;
  }
  return null;
}

function limits(bot) {
  const known = (boot.limits || {})[bot.name] || {};
  const defaults = boot.defaults || {};
  return {
    memory: known.memory_limit_mb ?? bot.spec.memory_limit_mb ?? defaults.memory_limit_mb ?? null,
    fds: figure(bot, "fd_limit") ?? known.open_files ?? null,
  };
}

const dash = "-";
function num(value, digits) { return value === null || value === undefined ? dash : value.toFixed(digits); }
function age(seconds) {
  if (seconds === null || seconds === undefined) return dash;
  const s = Math.floor(seconds);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(message) { document.getElementById("error").textContent = message || ""; }

async function api(method, path) {
  const init = { method, headers: { "Accept": "application/json" } };
  if (method !== "GET") init.headers["X-CSRF-Token"] = csrf;
  const answer = await fetch(path, init);
  if (answer.status === 401) {
    location.assign("/login?next=" + encodeURIComponent(location.pathname));
    throw new Error("the session ended");
  }
  const body = await answer.json();
  if (!answer.ok) throw new Error(body.detail || answer.statusText);
  return body;
}

// ------------------------------------------------------------------ cells

function memoryCell(bot) {
  const rss = bot.rss_mb;
  const limit = limits(bot).memory;
  const td = el("td", { class: "memory", "data-field": "memory" });
  if (rss === null || rss === undefined) { td.textContent = dash; return td; }
  td.append(el("span", { text: Math.round(rss) + (limit ? " / " + limit : "") + " MB" }));
  if (limit) {
    // memory_limit_mb caps the data segment (RLIMIT_DATA): the bar shows that share
    // when the API reports it, else RSS against the limit.
    const data = figure(bot, "data_mb");
    const dataLimit = figure(bot, "data_limit_mb");
    const share = Math.min(1, data !== null && dataLimit ? data / dataLimit : rss / limit);
    td.title = data !== null ? `data ${Math.round(data)} MB of ${Math.round(dataLimit || limit)} MB` : "RSS against memory_limit_mb";
    const bar = el("span", { class: "bar" + (share > 0.8 ? " high" : "") });
    const fill = el("span", { class: "fill" });
    fill.style.width = (share * 100).toFixed(1) + "%";
    bar.append(fill);
    td.append(bar);
  }
  return td;
}

function fdCell(bot) {
  const fds = figure(bot, "open_fds");
  const limit = limits(bot).fds;
  const text = fds === null ? dash : fds + (limit ? " / " + limit : "");
  return el("td", { "data-field": "fds", text });
}

function healthText(bot) {
  const h = bot.health || {};
  return (h.status || dash) + (h.failure ? ": " + h.failure.kind : "");
}

function telegramText(bot) {
  if (bot.telegram.connected) return "connected";
  return bot.telegram.last_error ? "no: " + bot.telegram.last_error : "no";
}

function actionButtons(name, onDone) {
  const box = el("span", { class: "actions" });
  for (const op of ["start", "stop", "restart"]) {
    const button = el("button", { type: "button", "data-op": op, "data-bot": name, text: op });
    button.addEventListener("click", async () => {
      for (const b of box.querySelectorAll("button")) b.disabled = true;
      try {
        await api("POST", `/api/v1/bots/${encodeURIComponent(name)}/${op}`);
        showError("");
      } catch (e) {
        showError(`${op} ${name}: ${e.message}`);
      } finally {
        for (const b of box.querySelectorAll("button")) b.disabled = false;
        onDone();
      }
    });
    box.append(button);
  }
  return box;
}

function fleetRow(bot) {
  const inOut = figure(bot, "messages_in") === null && figure(bot, "messages_out") === null
    ? dash : num(figure(bot, "messages_in"), 0) + " / " + num(figure(bot, "messages_out"), 0);
  const cpu = figure(bot, "cpu_percent");
  const pss = figure(bot, "pss_mb");
  const tr = el("tr", { "data-bot": bot.name },
    el("td", {}, el("a", { href: "/bots/" + encodeURIComponent(bot.name), text: bot.name })),
    el("td", { class: "state " + bot.state, "data-field": "state", text: bot.state }),
    el("td", { class: "health " + (bot.health ? bot.health.status : ""), "data-field": "health", text: healthText(bot) }),
    el("td", { class: bot.telegram.connected ? "ok" : "muted", "data-field": "telegram", text: telegramText(bot) }),
    el("td", { "data-field": "pid", text: bot.pid ?? dash }),
    el("td", { "data-field": "uptime", text: age(bot.uptime_s) }),
    el("td", { "data-field": "restarts", text: bot.restarts }),
    el("td", { "data-field": "cpu", text: cpu === null ? dash : cpu.toFixed(1) + " %" }),
    memoryCell(bot),
    el("td", { "data-field": "pss", text: pss === null ? dash : Math.round(pss) + " MB" }),
    fdCell(bot),
    el("td", { "data-field": "threads", text: figure(bot, "threads") ?? dash }),
    el("td", { "data-field": "messages", text: inOut }),
  );
  if (canOperate) tr.append(el("td", {}, actionButtons(bot.name, refreshSoon)));
  return tr;
}

// ------------------------------------------------------------------ pages

function renderFleet(bots) {
  const body = document.querySelector("#fleet tbody");
  body.replaceChildren(...bots.map(fleetRow));
  const counts = {};
  for (const b of bots) counts[b.state] = (counts[b.state] || 0) + 1;
  const parts = Object.entries(counts).map(([state, n]) => `${n} ${state}`);
  document.getElementById("summary").textContent = `${bots.length} bots` + (parts.length ? ": " + parts.join(", ") : "");
}

function renderFacts(bot) {
  const l = limits(bot);
  const cpu = figure(bot, "cpu_percent");
  const pss = figure(bot, "pss_mb");
  const fds = figure(bot, "open_fds");
  const facts = [
    ["state", bot.state, "state " + bot.state],
    ["health", healthText(bot)],
    ["Telegram", telegramText(bot)],
    ["pid", bot.pid ?? dash],
    ["uptime", age(bot.uptime_s)],
    ["restarts", bot.restarts],
    ["CPU", cpu === null ? dash : cpu.toFixed(1) + " %"],
    ["memory (RSS)", bot.rss_mb === null ? dash : Math.round(bot.rss_mb) + (l.memory ? " / " + l.memory : "") + " MB"],
    ["PSS", pss === null ? dash : Math.round(pss) + " MB"],
    ["open files", fds === null ? dash : fds + (l.fds ? " / " + l.fds : "")],
    ["threads", figure(bot, "threads") ?? dash],
    ["messages in / out", num(figure(bot, "messages_in"), 0) + " / " + num(figure(bot, "messages_out"), 0)],
    ["handler errors", figure(bot, "handler_errors") ?? dash],
    ["heartbeat age", bot.health && bot.health.heartbeat_age_s !== null ? bot.health.heartbeat_age_s + " s" : dash],
    ["reason", bot.reason || dash],
  ];
  const list = document.getElementById("facts");
  list.replaceChildren(...facts.flatMap(([term, value, cls]) => {
    const field = term.split(" ")[0].toLowerCase();
    return [el("dt", { text: term }), el("dd", { class: cls || "", "data-field": field, text: value })];
  }));
}

function appendEvent(row) {
  const body = document.querySelector("#events tbody");
  if (!body) return;
  const at = new Date(row.at);
  const what = (row.to_state ? `${row.from_state || ""} → ${row.to_state}: ` : "") + row.reason;
  body.prepend(el("tr", { class: "fresh" },
    el("td", { title: row.at, text: at.toTimeString().slice(0, 8) }),
    el("td", { text: row.kind }), el("td", { text: what }), el("td", { text: row.actor })));
  while (body.children.length > 60) body.lastElementChild.remove();
}

function appendHealth(row) {
  if (row.kind !== "health" && !(row.data && row.data.failure)) return;
  let list = document.getElementById("health");
  if (list.tagName !== "UL") {
    const fresh = el("ul", { id: "health", class: "health-list" });
    list.replaceWith(fresh);
    list = fresh;
  }
  const at = new Date(row.at);
  const recovered = row.data && row.data.recovery_s != null ? ` (recovered in ${row.data.recovery_s} s)` : "";
  list.prepend(el("li", { class: "fresh" },
    el("time", { title: row.at, text: at.toTimeString().slice(0, 8) }), " ",
    el("b", { text: (row.data && row.data.failure) || row.kind }), ` ${row.reason}${recovered}`));
}

// A JSON log line ({"ts", "level", "logger", "message", ...}) read as a person would;
// any other line as it is.
function logLine(line) {
  if (!line.startsWith("{")) return line;
  try {
    const entry = JSON.parse(line);
    if (typeof entry.message !== "string") return line;
    const { ts, level, logger, message, bot, ...rest } = entry;
    const extra = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
    return [String(ts || "").replace("T", " ").slice(0, 23), level, (logger || "") + ":", message, ...extra].join(" ");
  } catch (e) {
    return line;
  }
}

async function refreshLog() {
  const { lines } = await api("GET", `/api/v1/bots/${encodeURIComponent(boot.bot.name)}/logs?lines=${boot.log_lines}`);
  const text = lines.map(logLine).join("\n") + (lines.length ? "\n" : "");
  const pre = document.getElementById("log");
  if (pre.textContent !== text) {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = text;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }
}

// An inline SVG of memory (MB, left scale) and messages per minute (right scale).
function drawChart(points) {
  const box = document.getElementById("chart");
  const W = 640, H = 180, L = 44, R = 44, T = 10, B = 22;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "memory and message rate, last hour");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  // The last hour at most; at least 10 minutes, so a young bot's line is not a dot.
  const now = Date.now() / 1000;
  const span = Math.min(3600, Math.max(600, points.length ? now - points[0].at : 0));
  const from = now - span;
  const x = (at) => L + ((at - from) / span) * (W - L - R);
  const mem = points.filter((p) => p.rss_mb !== null);
  const rate = points.map((p) => ({ at: p.at, v: p.in_per_min === null && p.out_per_min === null ? null : (p.in_per_min || 0) + (p.out_per_min || 0) })).filter((p) => p.v !== null);
  const memMax = Math.max(1, ...mem.map((p) => p.rss_mb)) * 1.1;
  const rateMax = Math.max(1, ...rate.map((p) => p.v)) * 1.1;
  add("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "frame" });
  for (const quarter of [4, 3, 2, 1, 0]) {
    const minutes = Math.round((span * quarter) / 4 / 60);
    add("text", { x: x(now - (span * quarter) / 4), y: H - 6, class: "tick", "text-anchor": "middle" }, quarter ? `-${minutes}m` : "now");
  }
  add("text", { x: 4, y: T + 10, class: "tick mem" }, Math.round(memMax) + " MB");
  add("text", { x: W - 4, y: T + 10, class: "tick rate", "text-anchor": "end" }, rate.length ? Math.round(rateMax) + "/min" : "msgs -");
  const line = (series, value, max, cls) => {
    if (!series.length) return;
    const pts = series.map((p) => `${x(p.at).toFixed(1)},${(H - B - (value(p) / max) * (H - T - B)).toFixed(1)}`);
    add("polyline", { points: pts.join(" "), class: cls });
  };
  line(mem, (p) => p.rss_mb, memMax, "line mem");
  if (mem.length) {
    const last = mem[mem.length - 1];
    add("circle", { cx: x(last.at).toFixed(1), cy: (H - B - (last.rss_mb / memMax) * (H - T - B)).toFixed(1), r: 2.5, class: "dot mem" });
  }
  line(rate, (p) => p.v, rateMax, "line rate");
  if (!mem.length) add("text", { x: W / 2, y: H / 2, class: "tick", "text-anchor": "middle" }, "no samples yet");
  box.replaceChildren(svg);
}

// ------------------------------------------------------------------ live

let refreshTimer = null;


async function refresh() {
  try {
    if (page === "fleet") {
      renderFleet((await api("GET", "/api/v1/bots")).bots);
    } else if (page === "bot") {
      renderFacts(await api("GET", "/api/v1/bots/" + encodeURIComponent(boot.bot.name)));
      await refreshLog();
    }
  } catch (e) {
    showError(e.message);
  }
}

function refreshSoon() {
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refresh();
  }, 100);
}

const KINDS = ["transition", "created", "updated", "desired", "health", "bus", "defaults", "token", "secrets"];

function listen() {
  const source = new EventSource("/api/v1/events");
  const live = document.getElementById("live");
  source.onopen = () => live.classList.add("on");
  source.onerror = () => {
    live.classList.remove("on");
    if (source.readyState === EventSource.CLOSED) {
      // Refused (the session ended) or gone: a fetch tells which and sends us to log in.
      refresh();
      setTimeout(listen, REFRESH_MS);
    }
  };
  for (const kind of KINDS) {
    source.addEventListener(kind, (message) => {
      const row = JSON.parse(message.data);
      if (page === "bot") {
        if (row.bot !== boot.bot.name) return;
        appendEvent(row);
        appendHealth(row);
      }
      refreshSoon();
    });
  }
}

async function redrawChart() {
  try {
    const { points } = await api("GET", `/bots/${encodeURIComponent(boot.bot.name)}/samples`);
    drawChart(points);
  } catch (e) {
    showError(e.message);
  }
}

if (page === "fleet") {
  renderFleet(boot.bots);
} else if (page === "bot") {
  renderFacts(boot.bot);
  if (canOperate) document.getElementById("actions").append(actionButtons(boot.bot.name, refreshSoon));
  drawChart(boot.points);
  const pre = document.getElementById("log");
  pre.textContent = pre.textContent.split("\n").map(logLine).join("\n");
  pre.scrollTop = pre.scrollHeight;
  setInterval(redrawChart, boot.sample_every_s * 1000);
}
listen();
setInterval(refreshSoon, REFRESH_MS);
