// The explore page: plain JS against the service's own endpoints (no build step, no network besides this server).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, fileB: null, strip: null, frame: null, models: {} };

// --- HTTP ------------------------------------------------------------------------------------

function status(message, isError = false) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

// Every request goes through here: the selected model and, when set, the API key.
async function api(path, { method = "POST", body, accept, params = {} } = {}) {
  const query = new URLSearchParams(params);
  if ($("model").value) query.set("model", $("model").value);
  const headers = {};
  if (accept) headers.Accept = accept;
  const key = localStorage.getItem("vae.apiKey");
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(`${path}?${query}`, { method, body, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not our JSON error */ }
    if (response.status === 401 || response.status === 403) message += " (set the API key at the top right)";
    throw new Error(`${path}: ${message}`);
  }
  return response;
}

function form(fields) {
  const data = new FormData();
  for (const [name, blob] of Object.entries(fields)) data.append(name, blob, blob.name || name);
  return data;
}

// --- drawing ---------------------------------------------------------------------------------

function drawBitmap(canvas, bitmap) {
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff"; // the server composites alpha on white: do the same so the diff compares like with like
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(bitmap, 0, 0);
}

const pixels = (canvas) => canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);

// A perceptual dark-to-bright ramp (inferno-like) for error magnitudes in [0, 1].
const RAMP = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function ramp(v) {
  const x = Math.min(Math.max(v, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
  return RAMP[i].map((c, k) => c + (RAMP[i + 1][k] - c) * f);
}

function drawDiff() {
  const a = $("original"), b = $("recon"), out = $("diff");
  if (!a.width || a.width !== b.width || a.height !== b.height) return;
  const pa = pixels(a).data, pb = pixels(b).data, amp = Number($("amp").value);
  out.width = a.width; out.height = a.height;
  const img = out.getContext("2d").createImageData(a.width, a.height);
  let total = 0;
  for (let i = 0; i < pa.length; i += 4) {
    const d = (Math.abs(pa[i] - pb[i]) + Math.abs(pa[i + 1] - pb[i + 1]) + Math.abs(pa[i + 2] - pb[i + 2])) / 3;
    total += d;
    const [r, g, bl] = ramp((d * amp) / 255);
    img.data.set([r, g, bl, 255], i);
  }
  out.getContext("2d").putImageData(img, 0, 0);
  $("mae").textContent = `mean |error| ${(total / (pa.length / 4)).toFixed(2)} / 255`;
}

// Latents arrive raw (Accept: tensor/binary): little-endian float32 bytes, shape and dtype in headers.
function drawChannels(values, shape) {
  const [, c, h, w] = shape, box = $("channels");
  box.replaceChildren();
  for (let k = 0; k < c; k++) {
    const ch = values.subarray(k * h * w, (k + 1) * h * w);
    let min = Infinity, max = -Infinity, sum = 0, sq = 0;
    for (const v of ch) { min = Math.min(min, v); max = Math.max(max, v); sum += v; sq += v * v; }
    const mean = sum / ch.length, std = Math.sqrt(Math.max(sq / ch.length - mean * mean, 0));
    const canvas = document.createElement("canvas");
    canvas.width = w; canvas.height = h;
    const img = canvas.getContext("2d").createImageData(w, h), span = max - min || 1;
    ch.forEach((v, i) => { const g = (255 * (v - min)) / span; img.data.set([g, g, g, 255], 4 * i); });
    canvas.getContext("2d").putImageData(img, 0, 0);
    const fig = document.createElement("figure");
    const cap = document.createElement("figcaption");
    cap.textContent = `ch ${k}: μ ${mean.toFixed(2)} σ ${std.toFixed(2)} [${min.toFixed(1)}, ${max.toFixed(1)}]`;
    fig.append(canvas, cap);
    box.append(fig);
  }
  $("channels-note").textContent = `(each scaled from its own min to max; ${w}×${h} latent pixels)`;
}

// --- actions ---------------------------------------------------------------------------------

// The reconstruction, its latents and the download all use the same encode (colour lock or not).
const encodeParams = () => ($("colour-lock").checked ? { colour_lock: "1" } : {});

async function analyse() {
  if (!state.file) return;
  status(`Encoding and decoding ${state.file.name} …`);
  $("psnr").textContent = $("ssim").textContent = "…";
  try {
    drawBitmap($("original"), await createImageBitmap(state.file, { imageOrientation: "from-image" }));
    const [rt, enc] = await Promise.all([
      api("/roundtrip", { body: form({ image: state.file }), accept: "image/png", params: encodeParams() }),
      api("/encode", { body: form({ image: state.file }), accept: "tensor/binary", params: encodeParams() }),
    ]);
    drawBitmap($("recon"), await createImageBitmap(await rt.blob()));
    $("psnr").textContent = Number(rt.headers.get("X-PSNR")).toFixed(2);
    $("ssim").textContent = Number(rt.headers.get("X-SSIM")).toFixed(4);
    drawDiff();
    const shape = JSON.parse(enc.headers.get("shape"));
    if (enc.headers.get("dtype") !== "float32") throw new Error(`unexpected latent dtype ${enc.headers.get("dtype")}`);
    drawChannels(new Float32Array(await enc.arrayBuffer()), shape);
    const [, c, h, w] = shape, W = $("original").width, H = $("original").height;
    $("image-size").textContent = `${W}×${H}×3`;
    $("latent-size").textContent = `${w}×${h}×${c}`;
    $("ratio").textContent = `${((W * H * 3) / (w * h * c)).toFixed(1)}× fewer values`;
    $("download").disabled = false;
    $("interpolate").disabled = $("webp").disabled = !state.fileB;
    document.body.dataset.recon = "done";
    status(`${state.file.name}: reconstructed by ${$("model").value}`);
  } catch (err) {
    status(err.message, true);
  }
}

async function download() {
  try {
    const response = await api("/encode", {
      body: form({ image: state.file }), accept: "application/x-safetensors", params: encodeParams(),
    });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = `${state.file.name.replace(/\.[^.]*$/, "")}.${$("model").value}.latents.safetensors`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  } catch (err) {
    status(err.message, true);
  }
}

function showFrame() {
  if (!state.strip) return;
  const i = Number($("t").value), [h, w] = state.frame, canvas = $("frame");
  canvas.width = w; canvas.height = h;
  canvas.getContext("2d").drawImage(state.strip, i * w, 0, w, h, 0, 0, w, h);
  $("t-value").textContent = (i / Number($("t").max)).toFixed(2);
}

function interpolationParams(output) {
  return { steps: $("steps").value, method: $("method").value, output };
}

// One request returns every frame side by side (a PNG strip); the slider only redraws.
async function interpolate() {
  status(`Interpolating (${$("method").value}, ${$("steps").value} steps) …`);
  try {
    const response = await api("/interpolate", {
      body: form({ a: state.file, b: state.fileB }), params: interpolationParams("strip"),
    });
    state.frame = JSON.parse(response.headers.get("X-Frame-Size"));
    state.strip = await createImageBitmap(await response.blob());
    $("t").max = Number(response.headers.get("X-Frames")) - 1;
    $("t").value = 0;
    $("t").disabled = false;
    showFrame();
    document.body.dataset.interpolation = "done";
    status(`Interpolated ${response.headers.get("X-Frames")} frames (${$("method").value}); drag the slider.`);
  } catch (err) {
    status(err.message, true);
  }
}

async function animatedWebp() {
  try {
    const response = await api("/interpolate", {
      body: form({ a: state.file, b: state.fileB }), params: interpolationParams("webp"),
    });
    window.open(URL.createObjectURL(await response.blob()), "_blank");
  } catch (err) {
    status(err.message, true);
  }
}

async function sample() {
  const side = $("sample-size").value;
  status(`Sampling ${$("n").value} images …`);
  try {
    const response = await api("/sample", { params: { seed: $("seed").value, width: side, height: side, n: $("n").value } });
    $("samples").src = URL.createObjectURL(await response.blob());
    const first = Number(response.headers.get("X-Seed")), n = Number(response.headers.get("X-Frames"));
    status(`${n} samples, seeds ${first} to ${first + n - 1} left to right (sample i uses seed + i)`);
  } catch (err) {
    status(err.message, true);
  }
}

async function loadModels() {
  try {
    const { default: fallback, models } = await (await api("/v1/models", { method: "GET" })).json();
    const select = $("model");
    select.replaceChildren(...models.map((m) => new Option(m.name, m.name, false, m.name === fallback)));
    state.models = Object.fromEntries(models.map((m) => [m.name, m]));
    describeModel();
  } catch (err) {
    status(err.message, true);
  }
}

function describeModel() {
  const m = state.models[$("model").value];
  if (!m) return;
  $("model-info").textContent =
    `${m.class || "AutoencoderKL"} · ${m.latent_channels} latent channels · f=${m.downsample_factor}` +
    ` · scaling ${m.scaling_factor}` + (m.shift_factor === null ? "" : ` · shift ${m.shift_factor}`) +
    ` · ${(m.parameters / 1e6).toFixed(2)} M params · ${m.dtype} on ${m.device}`;
}

// --- wiring ----------------------------------------------------------------------------------

function pickFile(file) {
  if (!file) return;
  state.file = file;
  delete document.body.dataset.recon;
  analyse();
}

window.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem("vae.apiKey") || "";
  $("api-key").addEventListener("change", (e) => {
    if (e.target.value) localStorage.setItem("vae.apiKey", e.target.value);
    else localStorage.removeItem("vae.apiKey");
    loadModels();
  });
  $("file").addEventListener("change", (e) => pickFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pickFile(e.dataTransfer.files[0]); });
  $("file-b").addEventListener("change", (e) => {
    state.fileB = e.target.files[0] || null;
    $("b-name").textContent = state.fileB ? state.fileB.name : "none";
    $("interpolate").disabled = $("webp").disabled = !(state.file && state.fileB);
  });
  $("model").addEventListener("change", () => { describeModel(); analyse(); });
  $("amp").addEventListener("change", drawDiff);
  $("colour-lock").addEventListener("change", analyse);
  $("download").addEventListener("click", download);
  $("interpolate").addEventListener("click", interpolate);
  $("webp").addEventListener("click", animatedWebp);
  $("t").addEventListener("input", showFrame);
  $("sample").addEventListener("click", sample);
  loadModels();
});
