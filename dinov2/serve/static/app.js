// dinov2-serve page: upload images to /api/predict, show one card per file, a summary table and
// a CSV download from /api/predict.csv. Plain DOM code, no framework, no external request.
"use strict";

const state = {
  health: null,
  files: [], // every File sent to the server, in card order (the CSV re-sends them)
  count: 0,
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(message, isError = false) {
  const status = document.getElementById("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

function percent(p) {
  return `${(100 * p).toFixed(1)} %`;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadHealth() {
  const info = document.getElementById("model-info");
  try {
    const response = await fetch("/api/health");
    if (!response.ok) throw new Error(await errorText(response));
    state.health = await response.json();
    const h = state.health;
    const reference = h.reference_size
      ? `${h.reference_size} reference cells`
      : "no reference set (start with --reference for similar cells)";
    info.textContent =
      `${h.model}: ${h.classes.length} classes (${h.classes.join(", ")}); ${h.backbone}; ` +
      `${h.image_size} px input on ${h.device}; ${reference}.`;
  } catch (err) {
    info.textContent = `The server does not answer: ${err.message}`;
    info.classList.add("error");
  }
}

function topClasses(probabilities, k) {
  return Object.entries(probabilities)
    .sort((a, b) => b[1] - a[1])
    .slice(0, k);
}

function tokenSwitch(result, overlay, caption) {
  const group = el("div", "tokens");
  group.setAttribute("role", "group");
  group.setAttribute("aria-label", "Attention of");
  const tokens = [["CLS", result.attention.cls]].concat(
    result.attention.registers.map((url, i) => [`reg${i}`, url]),
  );
  for (const [name, url] of tokens) {
    const button = el("button", "token", name);
    button.type = "button";
    button.dataset.token = name;
    button.setAttribute("aria-pressed", String(name === "CLS"));
    button.addEventListener("click", () => {
      overlay.src = url;
      overlay.dataset.token = name;
      caption.textContent = `attention of ${name}`;
      for (const other of group.querySelectorAll("button")) {
        other.setAttribute("aria-pressed", String(other === button));
      }
    });
    group.appendChild(button);
  }
  return group;
}

function neighboursBlock(neighbours) {
  const block = el("div", "neighbours");
  block.appendChild(el("h4", "", "Most similar reference cells"));
  const list = el("ol", "neighbour-list");
  for (const n of neighbours) {
    const item = el("li", "neighbour");
    const img = el("img", "neighbour-thumb");
    img.alt = n.path;
    img.title = n.path;
    img.loading = "lazy";
    img.src = n.thumbnail;
    img.addEventListener("error", () => img.replaceWith(el("span", "neighbour-missing", "no image")));
    item.append(img, el("span", "neighbour-class", n.class), el("span", "neighbour-sim", n.similarity.toFixed(3)));
    list.appendChild(item);
  }
  block.appendChild(list);
  return block;
}

function renderCard(result, file, number) {
  const card = el("article", "card");
  card.dataset.filename = result.filename;
  card.appendChild(el("h3", "filename", `${number}. ${result.filename}`));
  if (result.error) {
    card.classList.add("error");
    card.appendChild(el("p", "error-message", result.error));
    return card;
  }
  const images = el("div", "images");
  const original = el("figure");
  const img = el("img", "original");
  img.alt = result.filename;
  img.src = URL.createObjectURL(file);
  original.append(img, el("figcaption", "", "image"));
  const attention = el("figure");
  const overlay = el("img", "overlay");
  overlay.alt = `attention over ${result.filename}`;
  overlay.src = result.attention.cls;
  overlay.dataset.token = "CLS";
  const caption = el("figcaption", "", "attention of CLS");
  attention.append(overlay, caption);
  images.append(original, attention);
  card.appendChild(images);
  card.appendChild(tokenSwitch(result, overlay, caption));

  card.appendChild(el("p", "predicted", result.predicted_class));
  const bars = el("ol", "top3");
  for (const [name, p] of topClasses(result.probabilities, 3)) {
    const row = el("li", "class-row");
    const bar = el("span", "bar");
    const fill = el("span", "fill");
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.appendChild(fill);
    row.append(el("span", "class-name", name), bar, el("span", "class-prob", percent(p)));
    bars.appendChild(row);
  }
  card.appendChild(bars);
  if (result.neighbours.length) card.appendChild(neighboursBlock(result.neighbours));
  return card;
}

function addSummaryRow(result, number) {
  const row = el("tr", result.error ? "error" : "");
  row.append(
    el("td", "", String(number)),
    el("td", "", result.filename),
    el("td", "", result.predicted_class || ""),
    el("td", "", result.error ? "" : result.probability.toFixed(3)),
    el("td", "", result.error || ""),
  );
  document.querySelector("#summary tbody").appendChild(row);
  document.getElementById("summary-section").hidden = false;
}

function show(result, file) {
  state.count += 1;
  document.getElementById("cards").appendChild(renderCard(result, file, state.count));
  addSummaryRow(result, state.count);
}

function formData(files) {
  const data = new FormData();
  for (const file of files) data.append("files", file, file.name);
  return data;
}

// Files go to the server in requests of at most this many (and never more than its --max-files),
// so a large drop shows progress and stays under the per-request limits.
const CHUNK = 16;

function chunks(files) {
  const size = Math.max(1, Math.min(CHUNK, state.health ? state.health.max_files : CHUNK));
  const out = [];
  for (let i = 0; i < files.length; i += size) out.push(files.slice(i, i + size));
  return out;
}

async function classify(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  const limit = state.health ? state.health.max_upload_mb * 1024 * 1024 : Infinity;
  const accepted = [];
  for (const f of files) {
    if (f.size > limit) {
      const mb = (f.size / 1024 / 1024).toFixed(1);
      show({ filename: f.name, error: `${mb} MB, over the ${state.health.max_upload_mb} MB upload limit` }, f);
    } else {
      accepted.push(f);
    }
  }
  if (!accepted.length) return;
  const started = performance.now();
  let done = 0;
  let failed = 0;
  try {
    for (const part of chunks(accepted)) {
      setStatus(`Classifying ${done + 1}-${done + part.length} of ${accepted.length}…`);
      const response = await fetch("/api/predict", { method: "POST", body: formData(part) });
      if (!response.ok) throw new Error(await errorText(response));
      const results = await response.json();
      results.forEach((result, i) => {
        state.files.push(part[i]);
        show(result, part[i]);
        if (result.error) failed += 1;
      });
      done += part.length;
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    setStatus(`${done} file(s) in ${seconds} s${failed ? `, ${failed} could not be read` : ""}.`);
  } catch (err) {
    setStatus(`Upload refused after ${done} file(s): ${err.message}`, true);
  }
}

async function downloadCsv() {
  if (!state.files.length) return;
  setStatus("Preparing the CSV…");
  try {
    // One CSV from several requests: the header once, then every request's rows in order.
    let text = "";
    for (const part of chunks(state.files)) {
      const response = await fetch("/api/predict.csv", { method: "POST", body: formData(part) });
      if (!response.ok) throw new Error(await errorText(response));
      const body = await response.text();
      text += text ? body.slice(body.indexOf("\r\n") + 2) : body;
    }
    const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    const link = el("a");
    link.href = url;
    link.download = "predictions.csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    setStatus(`CSV of the ${state.files.length} file(s) sent to the server downloaded.`);
  } catch (err) {
    setStatus(`CSV failed: ${err.message}`, true);
  }
}

function clearAll() {
  for (const img of document.querySelectorAll("#cards img.original")) URL.revokeObjectURL(img.src);
  document.getElementById("cards").replaceChildren();
  document.querySelector("#summary tbody").replaceChildren();
  document.getElementById("summary-section").hidden = true;
  state.files = [];
  state.count = 0;
  setStatus("");
}

function setUp() {
  const zone = document.getElementById("drop-zone");
  const input = document.getElementById("file-input");
  input.addEventListener("change", () => {
    classify(input.files).finally(() => {
      input.value = "";
    });
  });
  // A file dropped next to the zone must not make the browser navigate away from the page.
  for (const type of ["dragover", "drop"]) {
    document.addEventListener(type, (event) => event.preventDefault());
  }
  zone.addEventListener("dragover", () => zone.classList.add("dragging"));
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    zone.classList.remove("dragging");
    classify(event.dataTransfer.files);
  });
  document.getElementById("download-csv").addEventListener("click", downloadCsv);
  document.getElementById("clear").addEventListener("click", clearAll);
  loadHealth();
}

document.addEventListener("DOMContentLoaded", setUp);
