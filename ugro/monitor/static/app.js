// The dashboard: one page script for every route; it fetches the JSON endpoints and polls them.
"use strict";

const main = document.getElementById("main");
const charts = {};  // chart id -> uPlot, kept across refreshes so a poll only swaps the data
let interval = 5;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function table(headers, rows) {
  return el("table", {}, el("tr", {}, headers.map(h => el("th", {}, h))),
            rows.map(r => el("tr", {}, r.map(c => el("td", {}, c ?? "-")))));
}

const num = (v, d = 1) => (v === null || v === undefined) ? "-" : Number(v).toFixed(d);
// A duration as people read it: s, m (`m` decimals), h.
const span = (s, m = 1) => (s === null || s === undefined) ? "-" : s < 90 ? `${num(s, 0)}s`
  : s < 5400 ? `${num(s / 60, m)}m` : `${num(s / 3600, 1)}h`;
const ago = s => (s === null || s === undefined) ? "-" : `${span(s, 0)} ago`;
const when = ts => ts ? new Date(ts * 1000).toLocaleString() : "-";
const gib = kib => kib ? `${num(kib / 1048576, 1)} GiB` : "-";
// A compared value as people read it: durations in h/m/s, other floats to 4 significant digits.
const cell = (key, v) => v === null || v === undefined ? "-"
  : typeof v !== "number" ? v
  : key.endsWith("_s") ? span(v) : Number.isInteger(v) ? v : Number(v.toPrecision(4));
const jobLink = id => el("a", { href: "/job/" + encodeURIComponent(id) }, id);

async function get(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

// A uPlot chart in `box`: x is time (or step), one series per entry of `series`.
function chart(box, id, xs, series, opts = {}) {
  const data = [xs, ...series.map(s => s.values)];
  const points = xs.length;
  box.setAttribute("data-points", points);
  box.setAttribute("data-series", series.length);
  let u = charts[id];
  if (u && u.root.isConnected && u.series.length === series.length + 1) {
    u.setData(data);
    box.append(u.root);
    return;
  }
  const width = Math.max(320, Math.min(box.clientWidth || 520, 900));
  u = new uPlot({
    width, height: opts.height || 180, title: opts.title,
    scales: { x: { time: opts.time !== false } , y: opts.y || {} },
    series: [{ label: opts.xlabel || "time" },
             ...series.map((s, i) => ({ label: s.label, stroke: COLORS[i % COLORS.length],
                                        width: 1.5, points: { show: points < 60 } }))],
    axes: [{}, { label: opts.ylabel, size: 64 }],
  }, data, box);
  charts[id] = u;
}
const COLORS = ["#1a73e8", "#e8711a", "#137333", "#c5221f", "#8430ce", "#00838f"];

// -- cluster ---------------------------------------------------------------------------
async function clusterPage() {
  const data = await get("/api/cluster");
  interval = data.interval_s;
  const cards = await Promise.all(data.nodes.map(async n => {
    const h = await get(`/api/history?node=${encodeURIComponent(n.node)}&seconds=3600`);
    const state = n.up ? el("span", { class: "up" }, "up")
      : el("span", { class: "down" }, `unreachable since ${when(n.down_since)}`);
    const card = el("div", { class: "card node", "data-node": n.node },
      el("h2", {}, n.node, " ", state),
      el("div", { class: "muted" }, `sampled ${ago(n.age_s)}`, n.stale ? " (stale)" : "",
         n.error ? ` — ${n.error}` : ""),
      table(["load", "memory available", "disk free"],
            [[`${num(n.load1, 2)} / ${num(n.load5, 2)} / ${num(n.load15, 2)}`,
              `${gib(n.memory_available_kib)} of ${gib(n.memory_total_kib)}`,
              `${gib(n.disk_free_kib)} (${n.disk_path || "-"})`]]),
      n.gpus.length ? table(["GPU", "model", "util", "memory used", "temp", "power"],
        n.gpus.map(g => [g.index, g.name, `${num(g.utilization_pct, 0)}%`,
                         `${num(g.memory_used_mib, 0)} / ${num(g.memory_total_mib, 0)} MiB`,
                         `${num(g.temperature_c, 0)} °C`, `${num(g.power_w, 1)} W`]))
        : el("p", { class: "muted" }, "no GPUs"),
      n.problems.length ? el("p", { class: "muted" }, n.problems.join("; ")) : null);
    const util = el("div", { class: "chart", id: `util-${n.node}` });
    const mem = el("div", { class: "chart", id: `mem-${n.node}` });
    card.append(util, mem);
    if (h.gpus.length) {
      chart(util, util.id, h.gpus[0].ts, h.gpus.map(g => ({ label: `GPU ${g.index} util %`,
            values: g.utilization_pct })), { title: "GPU utilisation (%)", y: { range: [0, 100] } });
      chart(mem, mem.id, h.gpus[0].ts, h.gpus.map(g => ({ label: `GPU ${g.index} MiB`,
            values: g.memory_used_mib })), { title: "GPU memory used (MiB)" });
    } else {
      chart(util, util.id, h.load.ts, [{ label: "load 1m", values: h.load.load1 }],
            { title: "load average (1 min)" });
    }
    return card;
  }));
  return [el("h2", {}, `Cluster — ${data.nodes.length} nodes`), el("div", { class: "grid" }, cards)];
}

// -- jobs -------------------------------------------------------------------------------
async function jobsPage() {
  const data = await get("/api/jobs");
  const running = data.running.map(j => {
    const box = el("div", { class: "chart", id: `loss-${j.job_id}` });
    const card = el("div", { class: "card job", "data-job": j.job_id },
      el("h3", {}, jobLink(j.job_id), " ", el("span", { class: j.status }, j.status),
         j.stalled ? el("span", { class: "stalled" }, ` STALLED (quiet ${ago(j.quiet_s)})`) : ""),
      table(["step", "epoch", "loss", "samples/s", "elapsed", "last log line per node"],
            [[j.step, j.epochs ? `${num(j.epoch, 2)} / ${j.epochs}` : num(j.epoch, 2),
              num(j.loss, 4), num(j.samples_per_sec, 1), span(j.elapsed_s, 0),
              Object.entries(j.log_age_s || {}).map(([n, s]) => `${n}: ${ago(s)}`).join(", ")]]),
      box);
    chart(box, box.id, j.curve.step, [{ label: "loss", values: j.curve.loss }],
          { time: false, xlabel: "step", title: "loss" });
    return card;
  });
  return [
    el("h2", {}, "Running"),
    running.length ? el("div", {}, running) : el("p", { class: "muted" }, "no running jobs"),
    el("h2", {}, "Queued"),
    data.queued.length ? table(["job", "reason"], data.queued.map(j => [jobLink(j.job_id), j.reason]))
      : el("p", { class: "muted" }, "no queued jobs"),
    el("h2", {}, "Recent"),
    table(["job", "status", "started", "duration", "steps", "final loss", "error"],
          data.recent.map(j => [jobLink(j.job_id), el("span", { class: j.status }, j.status),
            j.started_at, j.duration_s === null ? "-" : `${num(j.duration_s, 0)}s`, j.steps,
            num(j.final_loss, 4), j.error])),
  ];
}

// -- one job ----------------------------------------------------------------------------
async function jobPage(id) {
  const data = await get(`/api/job/${encodeURIComponent(id)}?lines=40`);
  const j = data.job, p = data.progress, m = j.metrics;
  const box = el("div", { class: "chart", id: "loss-curve" });
  const out = [
    el("h2", {}, j.job_id, " ", el("span", { class: j.status }, j.status),
       p.stalled ? el("span", { class: "stalled" }, " STALLED") : ""),
    el("div", { class: "card" }, table(["started", "ended", "duration", "world size", "steps",
                                        "final loss", "best loss", "samples/s"],
      [[j.started_at, j.ended_at, j.duration_s === null ? "-" : `${num(j.duration_s, 0)}s`,
        j.world_size, m.steps, num(m.final_loss, 4), num(m.best_loss, 4),
        num(m.samples_per_sec, 1)]]),
      table(["node", "node rank", "ranks", "status", "exit", "last log line"],
        j.nodes.map(n => [n.node, n.node_rank, n.nproc, n.status, n.exit_code,
                          ago((p.log_age_s || {})[n.node])]))),
  ];
  if (j.failure || j.error) {
    const f = j.failure || {};
    out.push(el("div", { class: "card failure" }, el("h3", { class: "FAILED" }, "Failure"),
      el("p", {}, f.summary || j.error),
      f.tail ? el("pre", {}, [].concat(f.tail).join("\n")) : null));
  }
  out.push(el("div", { class: "card" }, el("h3", {}, "Loss"), box));
  chart(box, box.id, data.curve.step, [{ label: "loss", values: data.curve.loss }],
        { time: false, xlabel: "step", title: "loss" });
  for (const [node, lines] of Object.entries(data.logs)) {
    const ranks = [...new Set(lines.map(l => l.rank).filter(r => r !== null))];
    out.push(el("div", { class: "card log", "data-node": node },
      el("h3", {}, `log: ${node}`, ranks.length ? ` (ranks ${ranks.join(", ")})` : ""),
      el("pre", {}, lines.map(l => `${l.node} ${l.rank === null ? "  " : "r" + l.rank} | ${l.text}`)
                         .join("\n") || "(no lines yet)")));
  }
  return out;
}

// -- compare ----------------------------------------------------------------------------
async function comparePage() {
  const jobs = new URLSearchParams(location.search).get("jobs") || "";
  const data = await get(`/api/compare?jobs=${encodeURIComponent(jobs)}`);
  const rows = data.rows.map(r => {
    const tr = el("tr", { class: r.differs ? "differs" : "" }, el("td", {}, r.section),
                  el("td", {}, r.key), r.values.map(v => el("td", {}, cell(r.key, v))));
    return tr;
  });
  const box = el("div", { class: "chart", id: "compare-curves" });
  // Different jobs log different steps: align them on the union of steps, null where absent.
  const steps = [...new Set(Object.values(data.curves).flatMap(c => c.step))].sort((a, b) => a - b);
  const series = data.jobs.map(id => {
    const at = new Map(data.curves[id].step.map((s, i) => [s, data.curves[id].loss[i]]));
    return { label: id, values: steps.map(s => at.has(s) ? at.get(s) : null) };
  });
  const out = [el("h2", {}, "Compare"),
    el("div", { class: "card" }, el("table", {},
      el("tr", {}, el("th", {}, ""), el("th", {}, ""), data.jobs.map(id => el("th", {}, jobLink(id)))),
      rows)),
    el("div", { class: "card" }, el("h3", {}, "Loss"), box)];
  chart(box, box.id, steps, series, { time: false, xlabel: "step", title: "loss" });
  return out;
}

// -- routing and polling ----------------------------------------------------------------
function page() {
  const path = location.pathname;
  if (path.startsWith("/job/")) return () => jobPage(decodeURIComponent(path.slice(5)));
  if (path === "/jobs") return jobsPage;
  if (path === "/compare") return comparePage;
  return clusterPage;
}

async function refresh() {
  try {
    const content = await page()();
    main.replaceChildren(...[content].flat());
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    main.replaceChildren(el("p", { class: "down" }, String(e.message || e)));
  }
  setTimeout(refresh, interval * 1000);
}
refresh();
