// The page's behaviour: reads the model card, sends the form to the images API with stream: true,
// and shows the stream's progress, previews and final images. Plain JavaScript, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_NAME = "ortdiffusion-api-key";
const MAX_SEED = 2 ** 32 - 1;

let card = null;        // the model card from /v1/models
let lastSeed = null;    // the first seed of the last result, for "Reuse last seed"
let running = null;     // the AbortController of the request in flight
let edit = null;        // {image: HTMLImageElement, mask: HTMLCanvasElement, painted: bool} while editing

// -- the API key and the model --------------------------------------------------------------------

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_NAME);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function askKey(message) {
  $("generate").hidden = true;
  $("key-form").hidden = false;
  $("api-key").focus();
  if (message) showError(message);
}

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders() });
  } catch (e) {
    showError(`The service did not answer: ${e.message}`);
    return;
  }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_NAME);
    askKey();
    return;
  }
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  card = (await response.json()).data[0];
  const d = card.defaults || {};
  for (const [id, value] of [["width", d.width], ["height", d.height], ["steps", d.steps], ["guidance", d.guidance_scale]]) {
    if (value !== undefined) $(id).value = value;
  }
  for (const id of ["width", "height"]) {
    Object.assign($(id), { min: d.size_min, max: d.size_max, step: d.size_multiple });
  }
  if (d.max_images) $("n").max = d.max_images;
  $("scheduler").replaceChildren(...(card.schedulers || [d.scheduler]).map((name) => new Option(name, name, false, name === d.scheduler)));
  $("edit").hidden = !(card.tasks || []).includes("inpainting");
  $("model").textContent = `Model: ${card.id} (${(card.tasks || []).join(", ")})`;
  $("key-form").hidden = true;
  $("generate").hidden = false;
  $("prompt").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_NAME, $("api-key").value.trim());
  $("api-key").value = "";
  hideError();
  loadModel();
});

// -- errors ---------------------------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function hideError() {
  showError("");
}

async function errorMessage(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: keep the status line */ }
  if (response.status === 429) {
    return `The queue is full: the service is busy with other requests. Try again in a moment. (${message})`;
  }
  if (response.status === 400) return `The request is invalid: ${message}`;
  return `The service refused the request (${response.status}): ${message}`;
}

// -- seeds ------------------------------------------------------------------------------------------

function chooseSeed() {
  if (!$("random-seed").checked && $("seed").value !== "") return Number($("seed").value);
  const seed = crypto.getRandomValues(new Uint32Array(1))[0] % MAX_SEED;
  $("seed").placeholder = `random (last: ${seed})`;
  return seed;
}

$("seed").addEventListener("input", () => { $("random-seed").checked = $("seed").value === ""; });
$("random-seed").addEventListener("change", () => { if ($("random-seed").checked) $("seed").value = ""; });
$("reuse-seed").addEventListener("click", () => reuseSeed(lastSeed));

function reuseSeed(seed) {
  if (seed === null) return;
  $("seed").value = seed;
  $("random-seed").checked = false;
  $("seed").focus();
}

// -- the image to edit and its mask ---------------------------------------------------------------

$("image").addEventListener("change", async () => {
  const file = $("image").files[0];
  if (!file) return clearImage();
  const image = new Image();
  image.src = URL.createObjectURL(file);
  try {
    await image.decode();
  } catch (e) {
    showError(`image: this file could not be read as an image (${file.name})`);
    return clearImage();
  }
  const mask = document.createElement("canvas");
  Object.assign(mask, { width: image.naturalWidth, height: image.naturalHeight });
  edit = { image, mask, painted: false };
  const canvas = $("mask-canvas");
  Object.assign(canvas, { width: image.naturalWidth, height: image.naturalHeight, hidden: false });
  const d = card.defaults || {};
  if (image.naturalWidth >= d.size_min && image.naturalWidth <= d.size_max) $("width").value = image.naturalWidth;
  if (image.naturalHeight >= d.size_min && image.naturalHeight <= d.size_max) $("height").value = image.naturalHeight;
  drawMask();
});

function clearImage() {
  edit = null;
  $("image").value = "";
  Object.assign($("mask-canvas"), { width: 0, height: 0, hidden: true });
}

function drawMask() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  ctx.globalCompositeOperation = "source-over";
  ctx.globalAlpha = 1;
  ctx.drawImage(edit.image, 0, 0);
  ctx.globalAlpha = 0.55;
  ctx.drawImage(edit.mask, 0, 0);
  ctx.globalAlpha = 1;
}

function paintAt(event) {
  if (!edit) return;
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width;
  const y = (event.clientY - box.top) * canvas.height / box.height;
  const radius = Number($("brush").value) * canvas.width / box.width / 2;
  const ctx = edit.mask.getContext("2d");
  ctx.fillStyle = "#ff3c9a";
  ctx.beginPath();
  ctx.arc(x, y, radius, 0, 2 * Math.PI);
  ctx.fill();
  edit.painted = true;
  drawMask();
}

$("mask-canvas").addEventListener("pointerdown", (event) => { $("mask-canvas").setPointerCapture(event.pointerId); paintAt(event); });
$("mask-canvas").addEventListener("pointermove", (event) => { if (event.buttons) paintAt(event); });
$("mask-all").addEventListener("click", () => {
  if (!edit) return;
  const ctx = edit.mask.getContext("2d");
  ctx.fillStyle = "#ff3c9a";
  ctx.fillRect(0, 0, edit.mask.width, edit.mask.height);
  edit.painted = true;
  drawMask();
});
$("mask-clear").addEventListener("click", () => {
  if (!edit) return;
  edit.mask.getContext("2d").clearRect(0, 0, edit.mask.width, edit.mask.height);
  edit.painted = false;
  drawMask();
});
$("image-clear").addEventListener("click", clearImage);

function canvasBlob(canvas) {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// OpenAI's convention: the mask's fully transparent pixels are the area to edit (no paint: all of it).
async function editFiles() {
  const { image, mask, painted } = edit;
  const source = document.createElement("canvas");
  Object.assign(source, { width: image.naturalWidth, height: image.naturalHeight });
  source.getContext("2d").drawImage(image, 0, 0);
  const out = document.createElement("canvas");
  Object.assign(out, { width: mask.width, height: mask.height });
  const ctx = out.getContext("2d");
  if (painted) {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(mask, 0, 0);
  }
  return [await canvasBlob(source), await canvasBlob(out)];
}

// -- generating -----------------------------------------------------------------------------------

function requestFields(seed) {
  const fields = {
    prompt: $("prompt").value,
    size: `${$("width").value}x${$("height").value}`,
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    scheduler: $("scheduler").value,
    n: Number($("n").value),
    seed,
    stream: true,
    partial_images: 3,
    progress: true,
  };
  if ($("negative-prompt").value) fields.negative_prompt = $("negative-prompt").value;
  return fields;
}

async function buildRequest(fields) {
  if (!edit) {
    return { url: "/v1/images/generations", headers: authHeaders({ "Content-Type": "application/json" }),
             body: JSON.stringify(fields) };
  }
  const [image, mask] = await editFiles();
  const form = new FormData();
  form.append("image", image, "image.png");
  form.append("mask", mask, "mask.png");
  for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
  return { url: "/v1/images/edits", headers: authHeaders(), body: form };
}

$("generate").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (running) return;
  hideError();
  const fields = requestFields(chooseSeed());
  const request = await buildRequest(fields);
  running = new AbortController();
  startProgress(fields.n);
  try {
    const response = await fetch(request.url, { method: "POST", headers: request.headers, body: request.body,
                                                signal: running.signal });
    if (response.status === 401) {
      sessionStorage.removeItem(KEY_NAME);
      askKey("The API key was refused: enter it again.");
      return;
    }
    if (!response.ok) {
      showError(await errorMessage(response));
      return;
    }
    await readEvents(response.body, (name, data) => onEvent(name, data, fields));
  } catch (e) {
    showError(e.name === "AbortError" ? "Stopped." : `The connection failed: ${e.message}`);
  } finally {
    running = null;
    endProgress();
  }
});

$("stop").addEventListener("click", () => { if (running) running.abort(); });

// Server-sent events over fetch (EventSource cannot send the API key header).
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

function onEvent(name, data, fields) {
  if (name === "error") {
    showError(data.error ? data.error.message : "the service reported an error");
  } else if (name.endsWith(".progress")) {
    const area = $("progress-area");
    area.dataset.updates = Number(area.dataset.updates || 0) + 1;
    const image = fields.n > 1 ? ` (image ${data.image_index + 1} of ${fields.n})` : "";
    $("progress-text").textContent = `Step ${data.step} of ${data.steps}${image}`;
    $("progress").max = data.steps;
    $("progress").value = data.step;
  } else if (name.endsWith(".partial_image")) {
    previewImage(data.image_index).src = `data:image/${data.output_format};base64,${data.b64_json}`;
  } else if (name.endsWith(".completed")) {
    previewImage(data.image_index).remove();
    addResult(data, fields);
  }
}

function startProgress(n) {
  const area = $("progress-area");
  area.hidden = false;
  area.dataset.updates = 0;
  $("progress-text").textContent = n > 1 ? `Queued: ${n} images` : "Queued";
  $("progress").value = 0;
  $("previews").replaceChildren();
  $("go").disabled = true;
  $("stop").disabled = false;
}

function endProgress() {
  $("go").disabled = false;
  $("stop").disabled = true;
  $("previews").replaceChildren();
  if (!$("progress-text").textContent.startsWith("Done")) $("progress-text").textContent = "";
  $("progress-area").hidden = !$("progress-text").textContent;
}

function previewImage(index) {
  let image = document.querySelector(`#previews img[data-index="${index}"]`);
  if (!image) {
    image = document.createElement("img");
    image.dataset.index = index;
    image.alt = `preview of image ${index + 1}`;
    $("previews").append(image);
  }
  return image;
}

// -- results ----------------------------------------------------------------------------------------

function addResult(data, fields) {
  const bytes = Uint8Array.from(atob(data.b64_json), (c) => c.charCodeAt(0));
  const meta = data.output_format === "png" ? pngText(bytes) : {};
  const url = `data:image/${data.output_format};base64,${data.b64_json}`;
  const figure = document.createElement("figure");
  const image = document.createElement("img");
  image.src = url;
  image.alt = meta.prompt || fields.prompt;
  image.className = "result";
  const caption = document.createElement("figcaption");
  const list = document.createElement("dl");
  const rows = [
    ["prompt", meta.prompt], ["negative", meta.negative_prompt], ["seed", meta.seed ?? data.seed],
    ["steps", meta.steps], ["scheduler", meta.scheduler], ["guidance", meta.guidance_scale], ["size", meta.size],
    ["task", meta.task], ["model", meta.model_hash],
    ["providers", data.providers && Object.entries(data.providers).map(([k, v]) => `${k}: ${v}`).join(", ")],
    ["time", data.timings && stageTimes(data.timings)],
  ];
  for (const [term, value] of rows) {
    if (value === undefined || value === null || value === "") continue;
    list.append(Object.assign(document.createElement("dt"), { textContent: term }),
                Object.assign(document.createElement("dd"), { textContent: String(value) }));
  }
  const download = Object.assign(document.createElement("a"), {
    href: url, download: `ortdiffusion-${data.seed}.${data.output_format}`, textContent: "Download" });
  const reuse = Object.assign(document.createElement("button"), { type: "button", textContent: "Reuse seed" });
  reuse.addEventListener("click", () => reuseSeed(data.seed));
  caption.append(list, download, " ", reuse);
  figure.append(image, caption);
  $("gallery").prepend(figure);
  $("empty").hidden = true;
  if (data.image_index === 0) {
    lastSeed = data.seed;
    $("reuse-seed").disabled = false;
  }
  $("progress-text").textContent = `Done: ${fields.n > 1 ? `${data.image_index + 1} of ${fields.n} images` : "1 image"}` +
    (data.timings ? ` in ${data.timings.total.toFixed(2)} s` : "");
}

function stageTimes(timings) {
  return Object.entries(timings).filter(([stage, s]) => stage !== "total" && s >= 0.0005)
    .map(([stage, s]) => `${stage} ${(s * 1000).toFixed(0)} ms`).join(", ") + `; total ${(timings.total * 1000).toFixed(0)} ms`;
}

// The parameters a PNG carries in its text chunks (tEXt, and uncompressed iTXt: UTF-8).
function pngText(bytes) {
  const out = {};
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder();
  for (let pos = 8; pos + 8 <= bytes.length;) {
    const length = view.getUint32(pos);
    const type = latin1.decode(bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, pos + 8 + length);
    const zero = data.indexOf(0);
    if (type === "tEXt" && zero > 0) {
      out[latin1.decode(data.subarray(0, zero))] = latin1.decode(data.subarray(zero + 1));
    } else if (type === "iTXt" && zero > 0 && data[zero + 1] === 0) {
      let text = data.indexOf(0, zero + 3) + 1;  // past the language tag
      text = data.indexOf(0, text) + 1;          // past the translated keyword
      out[latin1.decode(data.subarray(0, zero))] = utf8.decode(data.subarray(text));
    } else if (type === "IEND") {
      break;
    }
    pos += 12 + length;
  }
  return out;
}

loadModel();
