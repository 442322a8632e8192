// The playground at GET /: a client of the public API, nothing the page knows that
// /v1/models does not say. Progress comes from GET /v1/videos/{id}/events read with fetch
// (EventSource cannot send the Authorization header), polling the job when that fails. A job
// created with `stream` plays while it is decoded, through Media Source Extensions.
"use strict";

const TERMINAL = ["completed", "failed", "cancelled"];
const KEY_STORE = "wanserve.apiKey";
const LIST_EVERY_MS = 4000;
const $ = (id) => document.getElementById(id);

const state = {
  key: localStorage.getItem(KEY_STORE) || "",
  caps: null,
  current: null,        // the job shown in the job panel
  follow: null,         // AbortController of the running follow
  cancelled: new Set(), // ids this page asked to cancel
  videoUrl: null,
  thumbnails: new Map(), // job id → a promise of its thumbnail's object URL
  // ?progress=poll skips the event stream (the fallback, on purpose)
  pollOnly: new URLSearchParams(location.search).get("progress") === "poll",
};

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
  }
}

async function api(method, path, { body, headers, signal, raw } = {}) {
  const sent = new Headers(headers || {});
  if (state.key) sent.set("Authorization", `Bearer ${state.key}`);
  const resp = await fetch(path, { method, body, headers: sent, signal });
  if (!resp.ok) {
    let error = {};
    try { error = (await resp.json()).error || {}; } catch (_) { /* not the error shape */ }
    const failure = new ApiError(resp.status, error);
    if (resp.status === 401) askForKey(failure.message);
    throw failure;
  }
  return raw ? resp : resp.json();
}

// --- the API key ------------------------------------------------------------------------
function askForKey(message) {
  $("key-panel").hidden = false;
  $("create-fields").disabled = true;
  const refused = Boolean(state.key);
  $("key-error").hidden = !refused;
  $("key-error").textContent = refused ? `The key was refused: ${message}` : "";
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  localStorage.setItem(KEY_STORE, state.key);
  start();
});

// --- the form, built from /v1/models ----------------------------------------------------
function option(select, value, label) {
  select.append(Object.assign(document.createElement("option"), { value, textContent: label }));
}

function buildForm(model) {
  const caps = model.capabilities;
  state.caps = caps;
  $("model").textContent = model.id;
  for (const size of caps.sizes) option($("size"), size, size.replace("x", " × "));
  for (let frames = 1; frames <= caps.limits.max_frames; frames += 4) {
    option($("num_frames"), frames, `${frames}`);
  }
  $("num_frames").value = caps.defaults.num_frames;
  $("seconds").placeholder = (caps.defaults.num_frames / caps.defaults.fps).toString();
  $("fps").value = caps.defaults.fps;
  $("fps").max = caps.limits.max_fps;
  $("num_inference_steps").value = caps.defaults.num_inference_steps;
  $("num_inference_steps").max = caps.limits.max_steps;
  $("guidance_scale").value = caps.defaults.guidance_scale;
  $("negative_prompt").value = caps.defaults.negative_prompt;
  $("last_frame-field").hidden = !caps.last_frame;
  const adapters = model.adapters || [];
  $("lora-field").hidden = adapters.length === 0;
  if (adapters.length) {
    option($("lora"), "", "server default");
    option($("lora"), "none", "none (base model)");
    for (const adapter of adapters) option($("lora"), adapter.name, adapter.name);
  }
  const presets = caps.cache_presets || [];
  $("cache-field").hidden = presets.length === 0;
  for (const name of ["off", ...presets]) option($("cache"), name, name);
  if (presets.length) $("cache").value = caps.cache_default;
  $("create-fields").disabled = false;
}

$("length-unit").addEventListener("change", () => {
  const seconds = $("length-unit").value === "seconds";
  $("seconds-field").hidden = !seconds;
  $("num_frames-field").hidden = seconds;
});

for (const name of ["input_reference", "last_frame"]) {
  $(name).addEventListener("change", () => {
    const file = $(name).files[0];
    const preview = $(`${name}-preview`);
    preview.hidden = !file;
    if (file) preview.src = URL.createObjectURL(file);
  });
}

function requestBody() {
  const body = new FormData();
  const add = (name, value) => { if (value != null && String(value).trim() !== "") body.append(name, value); };
  add("prompt", $("prompt").value);
  add("negative_prompt", $("negative_prompt").value);
  const frames = [["input_reference", true], ["last_frame", state.caps.last_frame]];
  for (const [name, allowed] of frames) {
    const file = $(name).files[0];
    if (allowed && file) body.append(name, file, file.name);
  }
  add("size", $("size").value);
  if ($("length-unit").value === "seconds") add("seconds", $("seconds").value);
  else add("num_frames", $("num_frames").value);
  for (const name of ["fps", "num_inference_steps", "guidance_scale", "seed"]) add(name, $(name).value);
  if (!$("lora-field").hidden) add("lora", $("lora").value);
  if (!$("cache-field").hidden) add("cache", $("cache").value);
  if ($("stream").checked) add("stream", "true");
  return body;
}

// --- errors -----------------------------------------------------------------------------
function clearError() {
  $("error").hidden = true;
  for (const field of document.querySelectorAll("[aria-invalid]")) field.removeAttribute("aria-invalid");
}

function showError(error) {
  $("error").hidden = false;
  $("error-message").textContent = error.message;
  $("error-field").hidden = !error.param;
  $("error-param").textContent = error.param || "";
  const field = error.param && document.querySelector(`#create [name="${CSS.escape(error.param)}"]`);
  if (field) {
    field.setAttribute("aria-invalid", "true");
    field.focus();
  }
}

$("create").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearError();
  $("submit").disabled = true;
  try {
    const job = await api("POST", "/v1/videos", { body: requestBody(),
                                                   headers: { Prefer: "respond-async" } });
    track(job);
    refreshJobs();
  } catch (error) {
    showError(error);
  } finally {
    $("submit").disabled = false;
  }
});

// --- following one job ------------------------------------------------------------------
function showProgress(event) {
  $("job-id").textContent = event.id;
  $("status").textContent = event.status;
  $("status").dataset.status = event.status;
  $("progress").setAttribute("aria-valuenow", event.progress);
  $("progress-fill").style.width = `${event.progress}%`;
  $("step").textContent = event.total_steps ? ` step ${event.step || 0}/${event.total_steps}` : "";
  $("cancel").hidden = TERMINAL.includes(event.status);
  if (event.status === "failed" && event.error) showError(event.error);
}

function track(job) {
  if (state.follow) state.follow.abort();
  state.follow = new AbortController();
  state.current = job.id;
  $("video").hidden = $("download").hidden = $("playback").hidden = true;
  $("job-facts").textContent = "";
  showProgress(job);
  // true once it shows the video; the whole file is fetched at the end otherwise
  const live = job.stream && !TERMINAL.includes(job.status)
    ? playWhileDecoded(job.id, state.follow.signal).catch(() => false) : null;
  follow(job.id, state.follow.signal, live);
}

async function follow(id, signal, live) {
  let last;
  try {
    last = state.pollOnly ? await poll(id, signal) : await streamEvents(id, signal)
      .catch((error) => { if (signal.aborted) throw error; return poll(id, signal); });
  } catch (error) {
    if (signal.aborted) return;
    if (error.status === 404 && state.cancelled.has(id)) {
      last = { id, status: "cancelled", progress: 0 }; // cancelled, then deleted
      showProgress(last);
    } else {
      return showError(error);
    }
  }
  if (last.status === "completed") {
    const shown = live && await live;
    await Promise.all([shown || showVideo(id), showFacts(id)]).catch(showError);
  }
  refreshJobs();
}

async function showFacts(id) {
  const job = await api("GET", `/v1/videos/${id}`);
  if (state.current !== id) return;
  const took = job.inference_time_s == null ? "" : ` · generated in ${job.inference_time_s.toFixed(1)} s`;
  const sum = (counts) => Object.values(counts || {}).reduce((a, b) => a + b, 0);
  const cache = job.cache && job.cache.preset !== "off"
    ? ` · cache ${job.cache.preset}: ${sum(job.cache.cached)} of ${sum(job.cache.cached) + sum(job.cache.computed)} steps cached` : "";
  $("job-facts").textContent =
    `${job.size} · ${job.num_frames} frames at ${job.fps} fps · seed ${job.seed}${took}${cache}`;
}

async function streamEvents(id, signal) {
  const resp = await api("GET", `/v1/videos/${id}/events`,
                         { headers: { Accept: "text/event-stream" }, signal, raw: true });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the event stream ended before the job did");
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue; // a keep-alive comment
      const event = JSON.parse(data);
      showProgress(event);
      if (TERMINAL.includes(event.status)) {
        reader.cancel();
        return event;
      }
    }
  }
}

async function poll(id, signal) {
  for (;;) {
    const resp = await api("GET", `/v1/videos/${id}`, { signal, raw: true });
    const job = await resp.json();
    showProgress({ ...job, step: null, total_steps: null });
    if (TERMINAL.includes(job.status)) return job;
    const wait = Number(resp.headers.get("openai-poll-after-ms")) || 500;
    await new Promise((resolve) => setTimeout(resolve, wait));
    if (signal.aborted) throw new DOMException("aborted", "AbortError");
  }
}

async function showVideo(id) {
  // fetched, not linked: a plain <video src> could not send the API key
  const blob = await (await api("GET", `/v1/videos/${id}/content`, { raw: true })).blob();
  if (state.current !== id) return;
  play(URL.createObjectURL(blob));
  offerDownload(id, blob);
}

function play(url) {
  if (state.videoUrl) URL.revokeObjectURL(state.videoUrl);
  state.videoUrl = url;
  const video = $("video");
  video.src = url;
  video.hidden = false;
  video.play().catch(() => { /* autoplay refused: the controls are there */ });
}

function offerDownload(id, blob) {
  const link = $("download");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(blob);
  link.download = `${id}.mp4`;
  link.textContent = `Download MP4 (${(blob.size / 1024).toFixed(1)} KiB)`;
  link.hidden = false;
}

function showPlayback(mode, text) {
  $("playback").dataset.mode = mode;
  $("playback").textContent = text;
  $("playback").hidden = false;
}

// The codec of a fragmented MP4 from its first bytes (ftyp, then the moov whose avcC box holds
// the profile, its compatibility flags and the level); null until they have arrived.
function avcCodec(head) {
  for (let i = 0; i + 8 <= head.length; i++) {
    if (head[i] === 0x61 && head[i + 1] === 0x76 && head[i + 2] === 0x63 && head[i + 3] === 0x43) {
      return "avc1." + [...head.subarray(i + 5, i + 8)]
        .map((b) => b.toString(16).padStart(2, "0")).join("");
    }
  }
  return null;
}

function joined(parts) {
  const all = new Uint8Array(parts.reduce((n, part) => n + part.length, 0));
  parts.reduce((at, part) => { all.set(part, at); return at + part.length; }, 0);
  return all;
}

// A streamed job's MP4, fragment by fragment as GET /content sends them, appended to a
// MediaSource that plays from the first; where the browser has no MSE for its codec, the
// same response read to its end and played whole (and the page says so).
async function playWhileDecoded(id, signal) {
  const resp = await api("GET", `/v1/videos/${id}/content`, { raw: true, signal });
  const reader = resp.body.getReader();
  const parts = [];
  let codec = null;
  while (!codec) {
    const { value, done } = await reader.read();
    if (done) return false;
    parts.push(value);
    codec = avcCodec(joined(parts));
  }
  const type = `video/mp4; codecs="${codec}"`;
  if (!window.MediaSource || !MediaSource.isTypeSupported(type)) {
    showPlayback("whole", `This browser cannot play ${codec} while it arrives (no Media ` +
                 "Source Extensions for it): the video plays once it is complete.");
    for (let part; !(part = await reader.read()).done;) parts.push(part.value);
    if (state.current !== id) return true;
    const blob = new Blob(parts, { type: "video/mp4" });
    play(URL.createObjectURL(blob));
    offerDownload(id, blob);
    return true;
  }
  if (state.current !== id) return true;
  const source = new MediaSource();
  play(URL.createObjectURL(source));
  await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
  const buffer = source.addSourceBuffer(type);
  const append = (bytes) => new Promise((resolve, reject) => {
    buffer.addEventListener("updateend", resolve, { once: true });
    buffer.addEventListener("error", () => reject(new Error("the browser refused a fragment")),
                            { once: true });
    buffer.appendBuffer(bytes);
  });
  showPlayback("stream", "Playing while it is decoded.");
  await append(joined(parts));
  for (let part; !(part = await reader.read()).done;) {
    parts.push(part.value);
    await append(part.value);
  }
  source.endOfStream();
  if (state.current === id) offerDownload(id, new Blob(parts, { type: "video/mp4" }));
  return true;
}

async function cancel(id) {
  state.cancelled.add(id);
  try {
    await api("DELETE", `/v1/videos/${id}`);
  } catch (error) {
    showError(error);
  }
  refreshJobs();
}

$("cancel").addEventListener("click", () => state.current && cancel(state.current));

// --- recent jobs ------------------------------------------------------------------------
function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.id = job.id;
  row.dataset.status = job.status;
  const created = new Date(job.created_at * 1000).toLocaleTimeString();
  const cells = [job.id.slice(-8), job.status, `${job.progress}%`, job.size, job.num_frames, created];
  row.append(thumbnailCell(job),
             ...cells.map((text) => Object.assign(document.createElement("td"), { textContent: text })));
  const actions = document.createElement("td");
  const button = (label, action) => actions.append(Object.assign(document.createElement("button"), {
    type: "button", className: `small ${label.toLowerCase()}`, textContent: label, onclick: action }));
  if (job.status === "completed") button("Play", () => track(job));
  button(TERMINAL.includes(job.status) ? "Delete" : "Cancel", () => cancel(job.id));
  row.append(actions);
  return row;
}

// fetched with the key (an <img src> could not send it), once per job: the list refreshes often
function thumbnailCell(job) {
  const cell = document.createElement("td");
  if (job.status !== "completed") return cell;
  const img = Object.assign(document.createElement("img"), { className: "thumbnail", alt: "" });
  cell.append(img);
  if (!state.thumbnails.has(job.id)) {
    state.thumbnails.set(job.id, api("GET", `/v1/videos/${job.id}/content?variant=thumbnail`,
                                     { raw: true })
      .then(async (resp) => URL.createObjectURL(await resp.blob()))
      .catch(() => { state.thumbnails.delete(job.id); return ""; }));
  }
  state.thumbnails.get(job.id).then((url) => { if (url) img.src = url; });
  return cell;
}

async function refreshJobs() {
  if (!state.caps) return;
  try {
    const page = await api("GET", "/v1/videos?limit=10");
    $("jobs").tBodies[0].replaceChildren(...page.data.map(jobRow));
    $("jobs-empty").hidden = page.data.length > 0;
  } catch (error) {
    if (error.status !== 401) showError(error);
  }
}

$("refresh").addEventListener("click", refreshJobs);

// --- start ------------------------------------------------------------------------------
async function showEngine() {
  const engine = await fetch("/health").then((r) => r.json()).then((h) => h.engine, () => "unreachable");
  $("engine").textContent = $("engine").dataset.state = engine;
  if (engine !== "ready") setTimeout(showEngine, 2000);
}

async function start() {
  try {
    const models = await api("GET", "/v1/models");
    $("key-panel").hidden = true;
    if (!state.caps) buildForm(models.data[0]);
    else $("create-fields").disabled = false;
    refreshJobs();
  } catch (error) {
    if (error.status !== 401) showError(error);
  }
}

showEngine();
start();
setInterval(() => { if (!document.hidden) refreshJobs(); }, LIST_EVERY_MS);
