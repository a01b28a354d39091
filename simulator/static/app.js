// windedge wind farm dashboard: no build step, no framework; uPlot for the charts.
// Live data arrives over Server-Sent Events (/api/events); commands go to
// POST /api/turbines/<id>/command.
"use strict";

(function () {
  const MAX_CARDS = 24;          // more turbines than this: only the selected one gets a card
  const WINDOW_S = 30;           // seconds shown in the charts
  const GROUPS = ["vibration", "rotation", "voltage"];
  const FAULT_LABELS = {
    vibration: "vibration (gross)", rotation: "rotation (gross)", voltage: "voltage (gross)",
    rotor_imbalance: "rotor imbalance", bearing_wear: "bearing wear",
    generator_degradation: "generator degradation", brake_drag: "brake drag",
    stuck_sensor: "stuck sensor",
  };

  const state = {
    farm: null, ids: [], overview: null, selected: null, source: null,
    cells: [], cards: new Map(), charts: null, series: null, samples: 0, verdicts: 0,
  };
  const $ = (sel, root) => (root || document).querySelector(sel);

  function command(turbine, body) {
    return fetch(`/api/turbines/${encodeURIComponent(turbine)}/command`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    }).then((r) => r.ok ? r.json() : r.json().then((e) => { throw new Error(e.error); }))
      .catch((err) => { showError(String(err.message || err)); });
  }

  function showError(message) {
    const info = $("#selected-info");
    info.textContent = message;
  }

  // ---- farm overview (a cell per turbine: usable at thousands) -------------------------
  function buildOverview() {
    const grid = $("#overview");
    grid.textContent = "";
    state.cells = state.ids.map((id) => {
      const cell = document.createElement("span");
      cell.className = "cell stopped";
      cell.title = id;
      cell.dataset.turbine = id;
      cell.addEventListener("click", () => select(id));
      grid.appendChild(cell);
      return cell;
    });
  }

  function cellClass(i, ov) {
    let cls = "cell ";
    if (!ov.running[i]) cls += "stopped";
    else if (ov.anomaly[i] < 0) cls += "waiting";
    else cls += ov.anomaly[i] ? "anomalous" : "normal";
    if (ov.faults[i]) cls += " faulted";
    if (state.ids[i] === state.selected) cls += " selected";
    return cls;
  }

  // ---- cards ------------------------------------------------------------------------------
  function makeCard(id) {
    const node = $("#card-template").content.firstElementChild.cloneNode(true);
    node.dataset.turbine = id;
    $(".tid", node).textContent = id;
    $(".tid", node).addEventListener("click", () => select(id));
    const button = $(".startstop", node);
    button.addEventListener("click", () => {
      const i = state.farm.index[id];
      const running = state.overview && state.overview.running[i];
      command(id, { action: running ? "stop" : "start" });
    });
    const list = $(".fault-list", node);
    state.farm.fault_kinds.forEach((kind, bit) => {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.className = "fault";
      box.dataset.kind = kind;
      box.addEventListener("change", () => {
        box.dataset.toggled = String(Date.now());  // the server's state catches up shortly
        command(id, box.checked ? { action: "fault", kind } : { action: "clear", kind });
      });
      label.appendChild(box);
      label.append(" " + (FAULT_LABELS[kind] || kind));
      list.appendChild(label);
      box.dataset.bit = String(bit);
    });
    return { node, angle: 0, rps: 0, blades: $(".blades", node) };
  }

  function layoutCards() {
    const wanted = state.ids.length <= MAX_CARDS ? state.ids : (state.selected ? [state.selected] : []);
    $("#cards-title").textContent = state.ids.length <= MAX_CARDS
      ? "Turbines" : "Selected turbine (the overview shows the whole farm)";
    const container = $("#cards");
    for (const [id, card] of state.cards) {
      if (!wanted.includes(id)) { card.node.remove(); state.cards.delete(id); }
    }
    for (const id of wanted) {
      if (!state.cards.has(id)) {
        const card = makeCard(id);
        state.cards.set(id, card);
        container.appendChild(card.node);
      }
    }
  }

  function updateCard(card, i, ov) {
    const running = !!ov.running[i];
    card.rps = running ? ov.rps[i] : Math.max(0, ov.rps[i]);
    card.node.classList.toggle("stopped", !running);
    card.node.classList.toggle("selected", state.ids[i] === state.selected);
    $(".startstop", card.node).textContent = running ? "Stop" : "Start";
    $(".rps", card.node).textContent = Number(ov.rps[i]).toFixed(2);
    $(".label", card.node).textContent = ov.labels[i] || "no model status yet";
    const bits = ov.anomaly[i];
    GROUPS.forEach((group, g) => {
      const light = $(`.light[data-group="${group}"]`, card.node);
      const cls = bits < 0 || !running ? "none" : (bits & (1 << g) ? "on" : "ok");
      light.className = "light " + cls;
    });
    const now = Date.now();
    for (const box of card.node.querySelectorAll("input.fault")) {
      // the server is the truth (other pages and MQTT commands toggle faults too),
      // except for a box the user has just toggled, whose command may be in flight
      if (now - Number(box.dataset.toggled || 0) > 2000) {
        box.checked = !!(ov.faults[i] & (1 << Number(box.dataset.bit)));
      }
    }
  }

  function spin(now) {
    const dt = state.lastFrame ? (now - state.lastFrame) / 1000 : 0;
    state.lastFrame = now;
    for (const card of state.cards.values()) {
      card.angle = (card.angle + 360 * card.rps * Math.min(dt, 0.1)) % 360;
      card.blades.setAttribute("transform", `rotate(${card.angle.toFixed(1)})`);
    }
    requestAnimationFrame(spin);
  }

  // ---- charts of the selected turbine -----------------------------------------------------
  function makeChart(el, title, series, extra) {
    const width = Math.max(300, el.clientWidth - 10);
    const opts = Object.assign({
      title, width, height: 190, legend: { live: false },
      scales: { x: { time: true } },
      series: [{}].concat(series),
      axes: [{}, { size: 60 }],
    }, extra || {});
    const data = [[]].concat(series.map(() => []));
    return new uPlot(opts, data, el);
  }

  function buildCharts() {
    const colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    const s = (label, i) => ({ label, stroke: colors[i % colors.length], width: 1, points: { show: false } });
    state.charts = {
      tilt: makeChart($("#chart-tilt"), "roll / pitch (rad)", [s("roll", 0), s("pitch", 1)]),
      yaw: makeChart($("#chart-yaw"), "yaw (rad)", [s("yaw", 2)]),
      speed: makeChart($("#chart-speed"), "wind / rotor speed (rps)", [s("wind", 0), s("rotor", 3)]),
      voltage: makeChart($("#chart-voltage"), "voltage (mV)", [s("voltage", 4)]),
      scores: makeChart($("#chart-scores"), "anomaly score / threshold",
        state.farm.features.map((f, i) => s(f, i)).concat([{ label: "threshold", stroke: "#000", dash: [6, 4], width: 1, points: { show: false } }])),
    };
    resetSeries();
  }

  function resetSeries() {
    state.series = { t: [], roll: [], pitch: [], yaw: [], wind_speed_rps: [], rps: [], voltage: [],
      vt: [], ratios: state.farm.features.map(() => []) };
    state.samples = 0; state.verdicts = 0;
  }

  function trim(arrays, times) {
    const cut = times.length ? times[times.length - 1] - WINDOW_S : 0;
    let k = 0;
    while (k < times.length && times[k] < cut) k++;
    if (k > 0) arrays.forEach((a) => a.splice(0, k));
  }

  function onTurbine(detail) {
    if (detail.id !== state.selected) return;
    const S = state.series;
    for (const name of ["roll", "pitch", "yaw", "wind_speed_rps", "rps", "voltage"]) {
      Array.prototype.push.apply(S[name], detail.samples[name]);
    }
    Array.prototype.push.apply(S.t, detail.t);
    state.samples += detail.t.length;
    trim([S.t, S.roll, S.pitch, S.yaw, S.wind_speed_rps, S.rps, S.voltage], S.t);
    for (const v of detail.verdicts) {
      S.vt.push(v.ts / 1000);
      v.scores.forEach((score, k) => S.ratios[k].push(v.thresholds[k] ? score / v.thresholds[k] : 0));
      state.verdicts += 1;
    }
    if (detail.verdicts.length) trim([S.vt].concat(S.ratios), S.vt);
    const C = state.charts;
    C.tilt.setData([S.t, S.roll, S.pitch]);
    C.yaw.setData([S.t, S.yaw]);
    C.speed.setData([S.t, S.wind_speed_rps, S.rps]);
    C.voltage.setData([S.t, S.voltage]);
    C.scores.setData([S.vt].concat(S.ratios, [S.vt.map(() => 1)]));
    $("#samples-count").textContent = String(state.samples);
    $("#verdicts-count").textContent = String(state.verdicts);
    const faults = detail.faults.map((f) => f.kind).join(", ");
    $("#selected-info").textContent = (detail.running ? "running" : "stopped") +
      (faults ? ` - faults: ${faults}` : "") + (detail.label ? ` - ${detail.label}` : "");
  }

  // ---- live updates -----------------------------------------------------------------------
  function onOverview(ov) {
    state.overview = ov;
    let running = 0, anomalous = 0, faulted = 0;
    for (let i = 0; i < state.ids.length; i++) {
      running += ov.running[i];
      if (ov.running[i] && ov.anomaly[i] > 0) anomalous++;
      if (ov.faults[i]) faulted++;
      const cls = cellClass(i, ov);
      const cell = state.cells[i];
      if (cell.className !== cls) cell.className = cls;
    }
    $("#n-running").textContent = String(running);
    $("#n-anomalous").textContent = String(anomalous);
    $("#n-faulted").textContent = String(faulted);
    $("#published").textContent = String(ov.published);
    for (const [id, card] of state.cards) updateCard(card, state.farm.index[id], ov);
  }

  function connect() {
    if (state.source) state.source.close();
    const url = "/api/events" + (state.selected ? `?turbine=${encodeURIComponent(state.selected)}` : "");
    const source = new EventSource(url);
    state.source = source;
    source.addEventListener("open", () => { $("#conn").className = "conn on"; $("#conn").textContent = "live"; });
    source.addEventListener("error", () => { $("#conn").className = "conn off"; $("#conn").textContent = "reconnecting"; });
    source.addEventListener("overview", (e) => onOverview(JSON.parse(e.data)));
    source.addEventListener("turbine", (e) => onTurbine(JSON.parse(e.data)));
  }

  function select(id) {
    if (id === state.selected) return;
    state.selected = id;
    history.replaceState(null, "", `#${encodeURIComponent(id)}`);
    $("#selected-id").textContent = id;
    $("#selected-info").textContent = "";
    resetSeries();
    layoutCards();
    if (state.overview) onOverview(state.overview);
    connect();
  }

  function start(farm) {
    farm.index = {};
    farm.ids.forEach((id, i) => { farm.index[id] = i; });
    state.farm = farm;
    state.ids = farm.ids;
    $("#n-turbines").textContent = String(farm.ids.length);
    buildOverview();
    buildCharts();
    $("#start-all").addEventListener("click", () => command("all", { action: "start" }));
    $("#stop-all").addEventListener("click", () => command("all", { action: "stop" }));
    $("#clear-all").addEventListener("click", () => command("all", { action: "clear" }));
    const wanted = decodeURIComponent(location.hash.slice(1));
    select(farm.index[wanted] !== undefined ? wanted : farm.ids[0]);
    requestAnimationFrame(spin);
  }

  fetch("/api/farm").then((r) => r.json()).then(start)
    .catch((err) => showError("cannot load the farm: " + err));
})();
