// fedvlm dashboard: renders /api/status payloads, live from /api/events (server-sent events), polling as fallback.
// Every value from the coordinator is set as text (never as HTML): site names and reasons are chosen by sites.
"use strict";

let latest = null;        // the last payload
let clockOffset = 0;      // server clock minus this browser's, in seconds
let streamErrors = 0;

const $ = (id) => document.getElementById(id);
const now = () => Date.now() / 1000 + clockOffset;

function ago(unix) {
  if (!unix) return "never";
  const s = Math.max(0, now() - unix);
  return s < 90 ? `${s.toFixed(0)}s ago` : `${(s / 60).toFixed(0)} min ago`;
}

function mib(bytes) { return (bytes / 1048576).toFixed(1); }

function progress(site) {
  if (site.steps_total) return `step ${site.step}/${site.steps_total}`;
  return "";
}

function inFlight(site) {
  return site.bytes_total ? `${mib(site.bytes_done)}/${mib(site.bytes_total)} MiB` : "";
}

function training(site) {
  if (!site.train_round) return "";
  return `${site.train_seconds.toFixed(1)}s, ${site.train_steps} steps (round ${site.train_round})`;
}

function metrics(values) {
  return Object.keys(values).sort().map((k) => `${k}=${Number(values[k]).toPrecision(3)}`).join(", ");
}

function row(cells, classes = {}) {
  const tr = document.createElement("tr");
  cells.forEach((text, i) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (classes[i]) td.className = classes[i];
    tr.appendChild(td);
  });
  return tr;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function headline(s) {
  if (!s.run_id) return ["no run yet", "", ""];
  const rounds = `${s.round} of ${s.total_rounds}`;
  if (s.run_state === "init") return ["init", "waiting for the initial adapter", ""];
  if (s.run_state === "done") return [rounds, "done", ""];
  if (s.run_state === "stopped") return [rounds, `stopped: ${s.stop_reason}`, ""];
  if (s.phase === "final evaluation") return [rounds, "final evaluation", `reports ${s.accepted}/${s.sampled}`];
  return [rounds, s.phase, `updates ${s.accepted}/${s.sampled} (quorum ${s.quorum})`];
}

function render(payload) {
  latest = payload;
  const s = payload.status;
  clockOffset = s.now_unix - Date.now() / 1000;
  $("federation").textContent = `federation ${s.federation_id.slice(0, 12)}`;
  $("run").textContent = s.run_id ? `run ${s.run_number}` : "-";
  $("run-detail").textContent = s.run_id ? `${s.run_id} · ${s.run_state}` : "";
  const [round, phase, updates] = headline(s);
  $("round").textContent = round;
  $("phase").textContent = phase;
  $("updates").textContent = updates;
  const notice = $("notice");
  notice.hidden = !s.config_notice;
  notice.textContent = s.config_notice;
  const audit = payload.audit;
  $("audit").textContent = audit.ok ? "verified" : "BROKEN";
  $("audit").className = audit.ok ? "value" : "value state-failed";
  $("audit-detail").textContent = audit.ok
    ? `${audit.entries} entries, ${audit.globals} signed globals · head ${audit.head.slice(0, 12)}`
    : audit.error;
  fill($("sites").tBodies[0], s.clients.map((c) => row(
    [c.name, c.state + (c.sampled ? " *" : ""), progress(c), inFlight(c), training(c), ago(c.last_heartbeat_unix),
     metrics(c.last_metrics), c.state === "failed" ? c.detail : ""],
    { 1: `state-${c.state}` })));
  fill($("runs").tBodies[0], s.runs.map((r) => row(
    [String(r.number), r.run_id, r.state, `${r.rounds_done}/${r.total_rounds}`, r.model, r.strategy, r.algorithm,
     r.stop_reason])));
  chartScores(payload.scores);
  chartDurations(s.rounds.filter((r) => r.round > 0));
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  tick();
}

function tick() {
  if (!latest) return;
  const s = latest.status;
  const left = s.deadline_unix ? s.deadline_unix - now() : 0;
  $("deadline").textContent = left > 0 ? `${left.toFixed(0)}s` : "-";
  const rows = $("sites").tBodies[0].rows;
  s.clients.forEach((c, i) => { if (rows[i]) rows[i].cells[5].textContent = ago(c.last_heartbeat_unix); });
}

const W = 420, H = 220, PAD = { left: 40, right: 10, top: 10, bottom: 30 };

function svgEl(name, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function axes(svg, xs, yMax, yLabel) {
  const x0 = PAD.left, y0 = H - PAD.bottom;
  svg.appendChild(svgEl("line", { x1: x0, y1: y0, x2: W - PAD.right, y2: y0, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: x0, y1: PAD.top, x2: x0, y2: y0, class: "axis" }));
  svg.appendChild(svgEl("text", { x: 2, y: PAD.top + 8 }, yLabel(yMax)));
  svg.appendChild(svgEl("text", { x: 2, y: y0 }, yLabel(0)));
  xs.forEach(([x, label]) => svg.appendChild(svgEl("text", { x: x - 4, y: H - 10 }, label)));
}

function chartScores(scores) {
  const svg = $("scores");
  svg.replaceChildren();
  if (!scores.length) { svg.appendChild(svgEl("text", { x: 150, y: 110 }, "no evaluation yet")); return; }
  $("score-caption").textContent = `held-out ${scores[0].metric} of each global`;
  const maxRound = Math.max(1, ...scores.map((p) => p.round));
  const yMax = Math.max(1, ...scores.map((p) => p.value));
  const x = (r) => PAD.left + (r / maxRound) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / yMax) * (H - PAD.top - PAD.bottom);
  axes(svg, scores.map((p) => [x(p.round), String(p.round)]), yMax, (v) => v.toFixed(2));
  svg.appendChild(svgEl("polyline", { class: "line", points: scores.map((p) => `${x(p.round)},${y(p.value)}`).join(" ") }));
  scores.forEach((p) => svg.appendChild(svgEl("circle", { class: "dot", cx: x(p.round), cy: y(p.value), r: 3 })));
}

function chartDurations(rounds) {
  const svg = $("durations");
  svg.replaceChildren();
  if (!rounds.length) { svg.appendChild(svgEl("text", { x: 150, y: 110 }, "no round finished yet")); return; }
  const seconds = rounds.map((r) => Math.max(0, r.finished_unix - r.started_unix));
  const yMax = Math.max(1, ...seconds);
  const slot = (W - PAD.left - PAD.right) / rounds.length;
  const xs = rounds.map((r, i) => [PAD.left + slot * (i + 0.5), String(r.round)]);
  axes(svg, xs, yMax, (v) => v.toFixed(0));
  seconds.forEach((s, i) => {
    const h = (s / yMax) * (H - PAD.top - PAD.bottom);
    svg.appendChild(svgEl("rect", { class: "bar", x: PAD.left + slot * i + slot * 0.2, width: slot * 0.6,
                                    y: H - PAD.bottom - h, height: h }));
  });
}

function setConnection(text, cls) {
  const badge = $("connection");
  badge.textContent = text;
  badge.className = `badge ${cls}`;
}

async function poll() {
  try {
    const reply = await fetch("/api/status", { credentials: "same-origin", cache: "no-store" });
    if (!reply.ok) throw new Error(String(reply.status));
    render(await reply.json());
    setConnection("live (polling)", "live");
  } catch (err) {
    setConnection(`lost (${err.message})`, "lost");
  }
  setTimeout(poll, 2000);
}

function connect() {
  if (!window.EventSource) { poll(); return; }
  const source = new EventSource("/api/events");
  source.addEventListener("status", (event) => {
    streamErrors = 0;
    render(JSON.parse(event.data));
    setConnection("live", "live");
  });
  source.onerror = () => {
    streamErrors += 1;
    setConnection("reconnecting…", "lost");
    if (streamErrors >= 3) { source.close(); poll(); }  // the stream keeps failing: poll instead
  };
}

setInterval(tick, 1000);
connect();
