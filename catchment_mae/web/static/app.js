// cmae web UI: plain fetch calls to the JSON API (same origin, so the server's
// Origin check lets them through); no framework, nothing loaded from elsewhere.
"use strict";

const cmae = (() => {
  const $ = (sel) => document.querySelector(sel);

  async function api(path, options = {}) {
    const response = await fetch(path, { credentials: "same-origin", ...options });
    let body;
    try {
      body = await response.json();
    } catch {
      body = { status: "error", message: `${response.status} ${response.statusText}` };
    }
    if (!response.ok) {
      const err = new Error(body.message || response.statusText);
      err.field = body.field;
      throw err;
    }
    return body;
  }

  function say(id, text, kind) {
    const el = $(id);
    el.textContent = text;
    el.className = `message ${kind || ""}`;
  }

  function formJSON(form) {
    const out = {};
    for (const el of form.elements) {
      if (!el.name || el.type === "file") continue;
      if (el.type === "checkbox") out[el.name] = el.checked;
      else if (el.value !== "") out[el.name] = el.value;
    }
    return out;
  }

  function postJSON(path, data) {
    return api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(data),
    });
  }

  function markField(form, field) {
    for (const el of form.elements) el.removeAttribute("aria-invalid");
    if (field && form.elements[field]) form.elements[field].setAttribute("aria-invalid", "true");
  }

  // ------------------------------------------------------------------ index
  async function loadData() {
    const data = await api("/api/data");
    $("#data-dirs").replaceChildren(...data.dirs.map((d) => new Option(d)));
    $("#data-tiffs").replaceChildren(...data.tiffs.map((t) => new Option(t)));
  }

  async function loadModels() {
    const { models } = await api("/api/models");
    const rows = models.map((m) => {
      const tr = document.createElement("tr");
      const cfg = m.config
        ? `${m.config.vit_model_name}, ${m.config.image_size} px, ${m.config.in_chans} channel(s)`
        : m.kind === "onnx" ? "ONNX encoder" : "";
      tr.innerHTML = "<td><code></code></td><td></td><td></td>";
      tr.children[0].firstChild.textContent = m.path;
      tr.children[1].textContent = cfg;
      const actions = tr.children[2];
      if (m.kind === "pth") {
        const b = document.createElement("button");
        b.textContent = "Export to ONNX";
        b.dataset.path = m.path;
        b.className = "export";
        b.onclick = () => exportModel(b);
        actions.append(b);
      } else {
        const a = document.createElement("a");
        a.href = m.download;
        a.textContent = "Download .onnx";
        actions.append(a);
      }
      return tr;
    });
    const body = $("#model-rows");  // the main page's table of models
    if (body && rows.length) body.replaceChildren(...rows);
    else if (body) body.innerHTML = '<tr><td colspan="3" class="muted">no models yet</td></tr>';
    for (const select of document.querySelectorAll(".model-select")) {
      const keep = select.value;
      const wanted = models.filter((m) => !select.classList.contains("onnx-only") || m.kind === "onnx");
      select.replaceChildren(...wanted.map((m) => new Option(m.path)));
      if (keep) select.value = keep;
    }
  }

  async function exportModel(button) {
    button.disabled = true;
    say("#models-message", `exporting ${button.dataset.path}…`);
    try {
      const r = await postJSON("/api/export", { model_path: button.dataset.path });
      say("#models-message",
        `exported ${r.onnx} (checked against torch: max abs ${r.max_abs.toExponential(1)}, min cosine ${r.min_cos.toFixed(6)})`, "ok");
      await loadModels();
    } catch (e) {
      say("#models-message", e.message, "error");
    } finally {
      button.disabled = false;
    }
  }

  async function loadJobs() {
    const { jobs } = await api("/api/jobs");
    const list = $("#job-list");
    if (!jobs.length) return;
    list.replaceChildren(...jobs.map((j) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `/jobs/${j.id}`;
      a.textContent = j.id;
      li.append(a, ` ${j.kind}: ${j.status}`);
      return li;
    }));
  }

  function startJobForm(formId, path, messageId) {
    const form = $(formId);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      markField(form, null);
      try {
        const r = await postJSON(path, formJSON(form));
        say(messageId, `started ${r.job}`, "ok");
        window.location.href = r.url;
      } catch (e) {
        markField(form, e.field);
        say(messageId, e.message, "error");
      }
    });
  }

  function embedForm() {
    const form = $("#embed-form");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      markField(form, null);
      say("#embed-message", "embedding…");
      const data = new FormData(form);
      if (!form.elements.image.files.length) data.delete("image");
      try {
        const r = await api("/api/embed", { method: "POST", body: data });
        $("#embed-preview").src = r.preview;
        $("#embed-shape").textContent = JSON.stringify(r.shape);
        $("#embed-size").textContent = `${r.height} x ${r.width} px, ${r.bands} band(s), model ${r.model}`;
        $("#embed-json").value = JSON.stringify({ status: r.status, embedding: r.embedding, shape: r.shape });
        $("#embed-result").hidden = false;
        say("#embed-message", "done", "ok");
      } catch (e) {
        markField(form, e.field);
        $("#embed-result").hidden = true;
        say("#embed-message", e.message, "error");
      }
    });
  }

  function index() {
    startJobForm("#train-form", "/api/train", "#train-message");
    startJobForm("#embed-dir-form", "/api/embed-dir", "#embed-dir-message");
    embedForm();
    loadData().catch((e) => say("#train-message", e.message, "error"));
    loadModels().catch((e) => say("#models-message", e.message, "error"));
    loadJobs().catch(() => {});
  }

  // -------------------------------------------------------------------- job
  function drawCurve(canvas, points) {
    if (points.length < 2) return;
    canvas.hidden = false;
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, pad = 36;
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    const y0 = Math.min(...ys), y1 = Math.max(...ys);
    const sx = (x) => pad + ((x - x0) / Math.max(x1 - x0, 1e-9)) * (w - 2 * pad);
    const sy = (y) => h - pad - ((y - y0) / Math.max(y1 - y0, 1e-9)) * (h - 2 * pad);
    ctx.clearRect(0, 0, w, h);
    ctx.strokeStyle = "#ccc";
    ctx.strokeRect(pad, pad, w - 2 * pad, h - 2 * pad);
    ctx.fillStyle = "#50575e";
    ctx.font = "12px system-ui";
    ctx.fillText(`loss ${y1.toFixed(3)}`, 4, pad - 6);
    ctx.fillText(`${y0.toFixed(3)}`, 4, h - pad + 14);
    ctx.fillText(`step ${x1}`, w - pad - 50, h - 8);
    ctx.strokeStyle = "#1f4e5f";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(sx(p[0]), sy(p[1])) : ctx.moveTo(sx(p[0]), sy(p[1]))));
    ctx.stroke();
  }

  function describe(j) {
    const p = j.progress || {};
    if (j.kind === "train" && p.steps) {
      const eta = p.eta_s > 0 && j.status === "running" ? `, ETA ${Math.round(p.eta_s)} s` : "";
      return `epoch ${p.epoch}/${p.epochs}, step ${p.step}/${p.steps}, loss ${p.loss.toFixed(4)}, ${p.images_per_s.toFixed(1)} images/s${eta}`;
    }
    if (j.kind === "embed-zones" && p.done !== undefined) {
      return `${p.done} catchment(s) read, ${p.failed || 0} failed, ${(p.rasters_per_s || 0).toFixed(1)} catchments/s`;
    }
    if (j.kind === "embed-dir" && p.done !== undefined) {
      return `${p.done} raster(s) read, ${p.failed || 0} failed, ${(p.rasters_per_s || 0).toFixed(1)} rasters/s`;
    }
    return "";
  }

  function job(id) {
    const cancel = $("#cancel");
    cancel.onclick = async () => {
      cancel.disabled = true;
      try {
        await postJSON(`/api/jobs/${id}/cancel`, {});
      } catch (e) {
        say("#job-message", e.message, "error");
      }
    };
    async function poll() {
      let j;
      try {
        j = await api(`/api/jobs/${id}`);
      } catch (e) {
        say("#job-message", e.message, "error");
        return;
      }
      $("#job-status").textContent = j.status;
      $("#job-progress").textContent = describe(j);
      drawCurve($("#loss-curve"), j.curve || []);
      const finished = ["done", "failed", "cancelled"].includes(j.status);
      if (finished) {
        cancel.hidden = true;
        if (j.error) say("#job-message", j.error, j.status === "failed" ? "error" : "");
        if (j.result) {
          $("#job-result").textContent = JSON.stringify(j.result, null, 2);
          $("#job-result").hidden = false;
        }
        if (j.download) {
          $("#download").href = j.download;
          $("#download").hidden = false;
        }
        return;
      }
      setTimeout(poll, 500);
    }
    poll();
  }

  // ------------------------------------------------------------ catchments
  // Similarity by rank among the others: light (least) to dark (most similar).
  const RAMP = ["#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"];

  function ramp(t) {
    const x = Math.min(Math.max(t, 0), 1) * (RAMP.length - 1);
    const i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
    const a = RAMP[i], b = RAMP[i + 1];
    const mix = (k) => Math.round(parseInt(a.slice(k, k + 2), 16) * (1 - f) + parseInt(b.slice(k, k + 2), 16) * f);
    return `rgb(${mix(1)}, ${mix(3)}, ${mix(5)})`;
  }

  const BASE = { color: "#1f4e5f", weight: 1, fillColor: "#9fb6bf", fillOpacity: 0.5 };
  const FAILED = { color: "#888", weight: 1, fillColor: "#bbb", fillOpacity: 0.3, dashArray: "3" };

  function catchments() {
    const view = { map: null, layer: null, table: null };

    async function loadTables(select) {
      const { tables } = await api("/api/zones/tables");
      $("#table-select").replaceChildren(...tables.map((t) => new Option(t)));
      if (select) $("#table-select").value = select;
      return tables;
    }

    async function show(table) {
      say("#map-message", "loading…");
      const fc = await api(`/api/zones/map?table=${encodeURIComponent(table)}`);
      if (!view.map) {
        view.map = L.map("map", { attributionControl: false });
        L.control.scale().addTo(view.map);
      }
      if (view.layer) view.layer.remove();
      view.table = table;
      view.layer = L.geoJSON(fc, {
        style: (f) => (f.properties.error ? FAILED : BASE),
        onEachFeature: (f, layer) => {
          layer.bindTooltip(f.properties.error ? `${f.id}: ${f.properties.error}` : String(f.id));
          layer.on("click", () => pick(f.id, f.properties.error));
        },
      }).addTo(view.map);
      if (fc.features.length) view.map.fitBounds(view.layer.getBounds(), { padding: [10, 10] });
      $("#similar").hidden = true;
      $("#legend").hidden = true;
      say("#map-message", `${fc.features.length} catchment(s): click one to see the most similar`, "ok");
    }

    async function pick(id, error) {
      if (error) {
        say("#map-message", `${id} was not embedded: ${error}`, "error");
        return;
      }
      const k = $("#k").value || 10;
      const query = `table=${encodeURIComponent(view.table)}&id=${encodeURIComponent(id)}&k=${k}`;
      let r;
      try {
        r = await api(`/api/zones/similar?${query}`);
      } catch (e) {
        say("#map-message", e.message, "error");
        return;
      }
      const ranked = Object.entries(r.similarity).filter(([key]) => key !== id).sort((a, b) => b[1] - a[1]);
      const rank = new Map(ranked.map(([key], i) => [key, i]));
      const n = Math.max(ranked.length - 1, 1);
      view.layer.setStyle((f) => {
        if (f.id === id) return { color: "#b32d2e", weight: 3, fillColor: "#e35d5e", fillOpacity: 0.9 };
        if (!rank.has(f.id)) return FAILED;
        return { color: "#1f4e5f", weight: 1, fillColor: ramp(1 - rank.get(f.id) / n), fillOpacity: 0.85 };
      });
      const shown = r.columns.slice(0, 4);
      const head = document.createElement("tr");
      for (const text of ["#", "catchment", "similarity", ...shown]) {
        const th = document.createElement("th");
        th.textContent = text;
        head.append(th);
      }
      $("#similar-head").replaceChildren(head);
      $("#similar-rows").replaceChildren(...r.nearest.map((h, i) => {
        const tr = document.createElement("tr");
        for (const v of [i + 1, h.path, h.similarity.toFixed(4), ...shown.map((c) => h[c])]) {
          const td = document.createElement("td");
          td.textContent = v === null || v === undefined ? "" : String(v);
          tr.append(td);
        }
        return tr;
      }));
      $("#similar-to").textContent = id;
      $("#similar-download").href = `/api/zones/similar?${query}&format=csv`;
      $("#similar").hidden = false;
      $("#legend").hidden = false;
      say("#map-message", `${r.nearest.length} most similar to ${id} listed; colours rank all ${ranked.length} others`, "ok");
    }

    $("#table-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const table = $("#table-select").value;
      if (table) show(table).catch((e) => say("#map-message", e.message, "error"));
    });

    const form = $("#zones-form");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      markField(form, null);
      let started;
      try {
        started = await postJSON("/api/embed-zones", formJSON(form));
      } catch (e) {
        markField(form, e.field);
        say("#zones-message", e.message, "error");
        return;
      }
      say("#zones-message", `started ${started.job}…`);
      for (;;) {
        let j;
        try {
          j = await api(`/api/jobs/${started.job}`);
        } catch (e) {
          say("#zones-message", e.message, "error");
          return;
        }
        const p = j.progress || {};
        if (j.status === "done") {
          say("#zones-message", `${j.result.summary}: ${j.result.out}`, "ok");
          await loadTables(j.result.out);
          await show(j.result.out).catch((e) => say("#map-message", e.message, "error"));
          return;
        }
        if (["failed", "cancelled"].includes(j.status)) {
          say("#zones-message", j.error || j.status, "error");
          return;
        }
        if (p.done !== undefined) say("#zones-message", `${p.done} catchment(s) read, ${p.failed || 0} failed…`);
        await new Promise((resolve) => setTimeout(resolve, 400));
      }
    });

    api("/api/data").then((data) => {
      $("#data-dirs").replaceChildren(...data.dirs.map((d) => new Option(d)));
      $("#data-zones").replaceChildren(...data.zones.map((z) => new Option(z)));
    }).catch((e) => say("#zones-message", e.message, "error"));
    loadModels().catch((e) => say("#zones-message", e.message, "error"));
    loadTables().then((tables) => {
      if (tables.length) show(tables[0]).catch((e) => say("#map-message", e.message, "error"));
    }).catch((e) => say("#map-message", e.message, "error"));
  }

  return { index, job, catchments };
})();

// The page says what it is (data-page); no inline script, so the
// Content-Security-Policy can forbid them.
document.addEventListener("DOMContentLoaded", () => {
  const { page, job } = document.body.dataset;
  if (page === "index") cmae.index();
  else if (page === "job") cmae.job(job);
  else if (page === "catchments") cmae.catchments();
});
