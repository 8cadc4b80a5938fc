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
    const body = $("#model-rows");
    if (rows.length) body.replaceChildren(...rows);
    else body.innerHTML = '<tr><td colspan="3" class="muted">no models yet</td></tr>';
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

  return { index, job };
})();

// The page says what it is (data-page); no inline script, so the
// Content-Security-Policy can forbid them.
document.addEventListener("DOMContentLoaded", () => {
  const { page, job } = document.body.dataset;
  if (page === "index") cmae.index();
  else if (page === "job") cmae.job(job);
});
