// The status page: the catalog by blocking queries on /v1/services, the rest from
// /ui/status.json every 2 s. Every value is put in the page as text (textContent /
// createTextNode), never as markup.
"use strict";
(function () {
  const view = { index: null, services: null, noCatalog: false, status: null, open: new Set() };

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function byId(id) { return document.getElementById(id); }
  function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }
  function clock(t) { return t ? new Date(t * 1000).toLocaleTimeString() : ""; }
  function ago(t) {
    if (!t) return "";
    const s = Math.max(0, Math.round(Date.now() / 1000 - t));
    if (s < 60) return s + "s ago";
    if (s < 3600) return Math.floor(s / 60) + "m ago";
    if (s < 86400) return Math.floor(s / 3600) + "h ago";
    return Math.floor(s / 86400) + "d ago";
  }
  function ms(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    return seconds < 1 ? (seconds * 1000).toFixed(1) + " ms" : seconds.toFixed(2) + " s";
  }
  function table(headers, rows) {
    return el("table", {}, el("tr", {}, headers.map((h) => el("th", {}, h))), rows);
  }
  function problem(text) {
    const node = byId("problem");
    node.hidden = !text;
    node.textContent = text || "";
  }

  // An instance is (service, id): one id can be registered under two services.
  function instanceKey(service, id) { return JSON.stringify([service, id]); }
  function byInstance(list) {
    const out = new Map();
    for (const item of list || []) out.set(instanceKey(item.service, item.id), item);
    return out;
  }
  function own(object, key) {  // a service or id may be named "constructor" or "__proto__"
    return object && Object.prototype.hasOwnProperty.call(object, key) ? object[key] : undefined;
  }

  function historyCell(h) {
    if (!h) return el("td", { class: "muted" }, "–");
    const key = "h:" + instanceKey(h.service, h.id);
    const details = el("details", { "data-key": key },
      el("summary", {}, h.transitions.length + " transitions ",
        h.flapping ? el("span", { class: "flapping" }, "flapping") : null),
      el("ol", { class: "history", reversed: "" }, h.transitions.slice().reverse().map((t) =>
        el("li", {}, el("span", { class: "muted" }, clock(t.at) + " "),
          el("span", { class: "state-" + t.state }, t.state), " ← " + t.cause,
          t.output ? el("span", { class: "muted" }, ": " + t.output) : null))));
    details.open = view.open.has(key);
    details.addEventListener("toggle", () => {
      if (details.open) view.open.add(key); else view.open.delete(key);
    });
    return el("td", {}, details);
  }

  function timingCell(t) {
    if (!t) return el("td", { class: "muted" }, "–");
    return el("td", { class: "mono" },
      "agent " + ms(t.event_to_write), el("br"),
      "→watcher " + ms(t.write_to_received), el("br"),
      "→HAProxy " + ms(t.received_to_applied));
  }

  function instanceRow(inst, checks, histories, timings) {
    const key = instanceKey(inst.service, inst.id);
    const check = checks.get(key);
    const hist = histories.get(key);
    const last = hist && hist.transitions.length ? hist.transitions[hist.transitions.length - 1] : null;
    const since = last ? last.at : inst.registered_at;
    const meta = Object.entries(inst.meta || {}).map(([k, v]) => el("div", { class: "meta" }, k + "=" + v));
    return el("tr", { "data-id": inst.id, class: "instance" },
      el("td", { class: "mono" }, inst.address + ":" + inst.port, el("br"),
        el("span", { class: "muted" }, inst.id)),
      el("td", {}, inst.node),
      el("td", {}, inst.zone || (inst.meta && inst.meta.zone) || ""),
      el("td", {}, (inst.tags || []).join(", ")),
      el("td", {}, String(inst.weight)),
      el("td", { class: "state-" + inst.state }, inst.state, el("br"),
        el("span", { class: "muted", title: clock(since) }, "since " + ago(since))),
      el("td", {}, check ? [check.type + (check.healthy ? " ✓ " : " ✗ "),
        el("span", { class: "muted" }, check.output)] : el("span", { class: "muted" }, "–")),
      el("td", {}, meta),
      timingCell(own(own(timings, inst.service), inst.id)),
      historyCell(hist));
  }

  function renderServices() {
    const box = byId("services");
    const status = view.status || {};
    const checks = byInstance(status.checks);
    const histories = byInstance(status.history);
    const timings = status.timings || {};  // service -> id -> timing
    let services = view.services;
    if (view.noCatalog) {  // an agent alone: its own instances, from its checks
      services = Object.create(null);  // a service may be named "constructor" or "__proto__"
      for (const c of status.checks || []) {
        (services[c.service] = services[c.service] || []).push({
          id: c.id, service: c.service, address: "", port: "", node: "", tags: [], weight: "",
          meta: {}, state: c.registered ? (c.maintenance ? "draining" : "up") : "down",
          registered_at: c.since });
      }
    }
    if (!services) return;
    const names = Object.keys(services).sort();
    if (!names.length) {
      box.replaceChildren(el("p", { class: "muted" }, "no services registered"));
      return;
    }
    box.replaceChildren(...names.map((name) => {
      const members = services[name];
      const up = members.filter((i) => i.state === "up").length;
      return el("div", { class: "service", "data-service": name },
        el("h3", {}, name, el("span", { class: "counts" },
          up + " up / " + (members.length - up) + " draining")),
        table(["address", "node", "zone", "tags", "weight", "state", "check", "meta",
          "propagation", "history"],
          members.map((inst) => instanceRow(inst, checks, histories, timings))));
    }));
  }

  function renderHealth() {
    const health = (view.status && view.status.health) || {};
    const bad = Object.entries(health).filter(([, c]) => !c.ok).map(([k]) => k);
    const badge = byId("health");
    badge.className = "badge " + (bad.length ? "bad" : "ok");
    badge.textContent = bad.length ? "degraded: " + bad.join(", ") : "healthy";
    byId("updated").textContent = "updated " + new Date().toLocaleTimeString() +
      (view.index !== null ? " · index " + view.index : "");
  }

  function renderHAProxy() {
    const data = view.status && view.status.haproxy;
    byId("haproxy-section").hidden = !data;
    if (!data) return;
    if (data.error) {
      byId("haproxy").replaceChildren(el("p", { class: "bad" }, data.error));
      return;
    }
    const backends = Object.entries(data.backends || {});
    byId("haproxy").replaceChildren(...backends.map(([name, b]) =>
      el("div", { class: "backend", "data-backend": name },
        el("h3", {}, "backend " + name, el("span", { class: "counts" },
          b.used + " of " + b.slots + " slots used")),
        table(["slot", "instance", "address", "admin", "health", "status", "weight",
          "sessions", "total"], b.servers.map((s) => el("tr", {},
          el("td", {}, s.slot), el("td", { class: "mono" }, s.instance),
          el("td", { class: "mono" }, s.address), el("td", { class: "state-" + s.state }, s.state),
          el("td", {}, s.health), el("td", {}, s.status), el("td", {}, String(s.weight)),
          el("td", {}, String(s.sessions)), el("td", {}, String(s.total))))))));
  }

  function renderEvents() {
    const events = (view.status && view.status.events) || null;
    byId("events-section").hidden = events === null;
    if (events === null) return;
    byId("events").replaceChildren(...(events.length ? events.map((e) =>
      el("li", { class: e.kind === "error" ? "bad" : "" }, clock(e.at) + " " + e.kind +
        (e.error ? ": " + e.error : ""))) : [el("li", { class: "muted" }, "none yet")]));
  }

  function renderPropagation() {
    const stages = view.status && view.status.propagation;
    byId("propagation-section").hidden = !stages;
    if (!stages) return;
    const labels = { event_to_write: "cause seen by the agent → registry write",
      write_to_received: "registry write → watcher received",
      received_to_applied: "watcher received → HAProxy applied",
      event_to_applied: "end to end" };
    const rows = Object.entries(labels).map(([key, label]) => {
      const s = stages[key] || {};
      return el("tr", { "data-stage": key }, el("td", {}, label), el("td", {}, String(s.count || 0)),
        el("td", {}, ms(s.p50)), el("td", {}, ms(s.p90)), el("td", {}, ms(s.p99)),
        el("td", {}, ms(s.max)));
    });
    byId("propagation").replaceChildren(
      el("tr", {}, ["stage", "changes", "p50", "p90", "p99", "max"].map((h) => el("th", {}, h))),
      ...rows);
  }

  function renderDeparted() {
    const departed = view.status && view.status.departed;
    byId("departed-section").hidden = !departed || !departed.length;
    if (!departed) return;
    byId("departed").replaceChildren(
      el("tr", {}, ["instance", "service", "left", "cause", "history"].map((h) => el("th", {}, h))),
      ...departed.map((h) => {
        const last = h.transitions[h.transitions.length - 1] || {};
        return el("tr", { "data-id": h.id, class: "departed" }, el("td", { class: "mono" }, h.id),
          el("td", {}, h.service), el("td", {}, ago(h.left_at)),
          el("td", {}, (last.cause || "") + (last.output ? ": " + last.output : "")),
          historyCell(h));
      }));
  }

  function render() {
    renderHealth();
    renderServices();
    renderHAProxy();
    renderEvents();
    renderPropagation();
    renderDeparted();
  }

  // at most one catalog read a second: each is the whole catalog (3 MB at 10,000 instances),
  // and a catalog that changes several times a second must not cost its host a read each time
  const CATALOG_EVERY_MS = 1000;

  async function followCatalog() {
    let last = 0;
    for (;;) {
      await sleep(Math.max(0, last + CATALOG_EVERY_MS - Date.now()));
      last = Date.now();
      try {
        const url = view.index === null ? "/v1/services" : "/v1/services?index=" + view.index + "&wait=30s";
        const resp = await fetch(url, { cache: "no-store" });
        if (resp.status === 404) { view.noCatalog = true; render(); return; }
        if (!resp.ok) throw new Error("/v1/services: HTTP " + resp.status);
        const body = await resp.json();
        view.index = Number(resp.headers.get("X-Discovery-Index")) || 0;
        view.services = body.services || {};
        problem("");
        render();
      } catch (err) {
        problem("catalog: " + err.message);
        await sleep(2000);
      }
    }
  }

  async function followStatus() {
    for (;;) {
      try {
        const resp = await fetch("/ui/status.json", { cache: "no-store" });
        if (!resp.ok) throw new Error("/ui/status.json: HTTP " + resp.status);
        view.status = await resp.json();
        render();
      } catch (err) {
        problem("status: " + err.message);
      }
      await sleep(2000);
    }
  }

  followCatalog();
  followStatus();
})();
