// The FuseMix search page: lists experiments (/api/experiments), sends a text query as JSON or a file
// as multipart (/api/search) and shows the results with their media (/api/media/...). Everything from
// the server is put on the page as text (textContent, src of same-origin URLs), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { experiments: [], maxUpload: 0, maxK: 100, previewUrl: null };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function kib(n) {
  return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MiB` : `${Math.ceil(n / 1024)} KiB`;
}

// The server's answer as {ok, data}; an answer that is not JSON (a proxy's error page) becomes a message.
async function call(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    return { ok: false, data: { error: `The server could not be reached (${err.message}).` } };
  }
  let data;
  try {
    data = await response.json();
  } catch (_err) {
    data = { error: `The server answered ${response.status} ${response.statusText} without details.` };
  }
  if (!response.ok && !data.error) data.error = `The server answered ${response.status}.`;
  return { ok: response.ok, data };
}

function currentExperiment() {
  return state.experiments.find((e) => e.name === $("experiment").value);
}

function fillTargets() {
  const exp = currentExperiment();
  const target = $("target");
  const previous = target.value;
  target.replaceChildren();
  if (!exp) return;
  const sides = Object.keys(exp.sides || {}).sort();
  for (const side of sides) {
    const count = exp.counts && exp.counts[side] != null ? ` (${exp.counts[side]})` : "";
    target.append(el("option", { value: side, text: `${side}${count}` }));
  }
  // Media first: searching captions is the less common wish.
  const media = sides.filter((s) => s !== "text");
  target.value = sides.includes(previous) ? previous : media[0] || sides[0];
  const uploads = sides.filter((s) => s === "image" || s === "audio");
  $("accepts").textContent =
    `Queries: text${uploads.length ? `, or an upload of ${uploads.join(" or ")}` : ""}` +
    (state.maxUpload ? ` (files up to ${kib(state.maxUpload)})` : "") + ".";
}

async function loadExperiments() {
  setStatus("Loading experiments…");
  const { ok, data } = await call("/api/experiments");
  setStatus("");
  if (!ok) {
    showError(data.error);
    return;
  }
  state.experiments = data.experiments || [];
  state.maxUpload = data.max_upload_bytes || 0;
  state.maxK = data.max_k || 100;
  $("k").max = String(state.maxK);
  const select = $("experiment");
  select.replaceChildren();
  for (const exp of state.experiments) {
    const label = exp.ready === false ? `${exp.name} (embeddings incomplete)` : exp.name;
    select.append(el("option", { value: exp.name, text: label }));
  }
  if (!state.experiments.length) {
    showError("There is no trained experiment to search yet: materialise an experiment and its embeddings first.");
    return;
  }
  fillTargets();
}

function uploadModality(file) {
  if (file.type.startsWith("image/")) return "image";
  if (file.type.startsWith("audio/")) return "audio";
  return "";
}

function showPreview(file) {
  const box = $("query-preview");
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = null;
  box.replaceChildren();
  box.hidden = true;
  if (!file) return;
  const kind = uploadModality(file);
  if (!kind) return;
  state.previewUrl = URL.createObjectURL(file);
  box.append(
    kind === "image"
      ? el("img", { src: state.previewUrl, alt: `query: ${file.name}` })
      : el("audio", { src: state.previewUrl, controls: true, preload: "none" }),
  );
  box.hidden = false;
}

function renderResults(results) {
  const list = $("results");
  list.replaceChildren();
  for (const r of results) {
    const head = el("div", { className: "head" }, [
      el("span", { className: "rank", text: `#${r.rank}` }),
      el("span", { className: "score", text: `score ${Number(r.score).toFixed(3)}` }),
    ]);
    const item = el("li", { className: "result", dataset: { mediaId: r.media_id, rank: String(r.rank) } }, [head]);
    const label = (r.captions && r.captions[0]) || r.text || r.media_id;
    if (r.media_url && r.modality === "image") {
      item.append(el("img", { src: r.media_url, alt: label, loading: "lazy" }));
    } else if (r.media_url && r.modality === "audio") {
      item.append(el("audio", { src: r.media_url, controls: true, preload: "none", title: label }));
    }
    if (r.text) item.append(el("div", { className: "text", text: r.text }));
    if (r.captions && r.captions.length) {
      item.append(el("ul", { className: "captions" }, r.captions.map((c) => el("li", { text: c }))));
    }
    item.append(el("div", { className: "id", text: `${r.dataset || ""} ${r.media_id}`.trim() }));
    list.append(item);
  }
}

async function search(event) {
  event.preventDefault();
  showError("");
  const exp = currentExperiment();
  if (!exp) {
    showError("Choose an experiment first.");
    return;
  }
  const k = Number($("k").value || 10);
  if (!Number.isInteger(k) || k < 1 || k > state.maxK) {
    showError(`Results must be a whole number from 1 to ${state.maxK}.`);
    return;
  }
  const file = $("file").files[0];
  const text = $("text").value.trim();
  let options;
  if (file) {
    if (file.size === 0) {
      showError(`${file.name} is empty (0 bytes).`);
      return;
    }
    if (state.maxUpload && file.size > state.maxUpload) {
      showError(`${file.name} is ${kib(file.size)}; the upload limit is ${kib(state.maxUpload)}.`);
      return;
    }
    const form = new FormData();
    form.append("experiment", exp.name);
    form.append("target", $("target").value);
    form.append("k", String(k));
    const modality = uploadModality(file);
    if (modality) form.append("modality", modality);
    form.append("file", file, file.name);
    options = { method: "POST", body: form };
  } else if (text) {
    options = {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ experiment: exp.name, target: $("target").value, text, k }),
    };
  } else {
    showError("Type a text query or choose an image or a sound file.");
    return;
  }
  $("search").disabled = true;
  setStatus("Searching…");
  const { ok, data } = await call("/api/search", options);
  $("search").disabled = false;
  if (!ok) {
    setStatus("");
    $("results").replaceChildren();
    showError(data.error);
    return;
  }
  const what = file ? file.name : `“${text}”`;
  setStatus(`${data.results.length} result${data.results.length === 1 ? "" : "s"} for ${what}`);
  renderResults(data.results);
}

document.addEventListener("DOMContentLoaded", () => {
  $("experiment").addEventListener("change", fillTargets);
  $("search-form").addEventListener("submit", search);
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    showPreview(file);
    setStatus(file ? `${file.name} will be the query (the text box is ignored until you clear the file).` : "");
  });
  $("clear-file").addEventListener("click", () => {
    $("file").value = "";
    showPreview(null);
  });
  loadExperiments();
});
