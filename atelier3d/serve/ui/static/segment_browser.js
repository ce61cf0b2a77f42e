// The Segment tab's clicks, decoded in this browser.
//
// SAM's encoder runs once per image on the server; its prompt decoder is small enough to run
// here. This module loads onnxruntime-web from the server (WebGPU where the browser has it,
// WASM otherwise), the same ONNX graph the server's decoder replicas run (a URL keyed by its
// hash, cached for good) and the session's embedding once per image (float16). Each click is
// decoded here and drawn at once; the step (prompt and candidates) is then recorded on the server
// with one request, and the tab redraws from the server's history, so undo/redo, other objects,
// the cut-out, parse, edit and mesh see the same objects as after a server click.
//
// Where the runtime or the graph cannot be loaded, clicks go to the server as before, and the
// line above the image says so. window.atelierSegment exposes the state and a decode function
// for the browser tests and the benchmark.

const STATE_SELECTOR = '#segment-state textarea';
const MODE_LINE_ID = 'decoder-mode';
const CORNER_HINT_ID = 'corner-hint';
const LOW_RES = 256;
const COLOUR = [30, 144, 255];

const api = {
  mode: 'starting',  // 'browser' | 'server' | 'starting'
  reason: '',
  backend: null,  // 'wasm' | 'webgpu'
  stats: {clicks: 0, clickMs: [], hovers: 0, hoverMs: [], embeddingBytes: 0, embeddingMs: []},
};
window.atelierSegment = api;

let ort = null;
let providers = ['wasm'];
const graphs = {};  // multimask (true/false) -> InferenceSession
const embeddings = new Map();  // session id -> Promise<Float32Array>
const lowResByStep = new Map();  // `${object}:${step}` -> [Float32Array] per candidate
let view = {};  // the tab's object, from the hidden #segment-state box or a recorded step
let viewText = '';
let corner = null;  // the first corner of a box being drawn
let dragTo = null;  // the pointer's corner while a box is dragged out from `corner`
let dragStart = null;  // where the button went down on the image: {point, x, y, moved}
let swallowClick = false;  // the click a finished drag ends with is not a point
const DRAG_PX = 6;  // screen pixels the pointer moves before a press becomes a drag
let hovering = false;  // a hover decode is running
let runs = Promise.resolve();  // decodes run one at a time: a session runs one call at once
let hoverPoint = null;
let hoverMask = null;
let committed = null;  // {mask, step, object}: drawn until the server's overlay shows it

// ---- float16 ----------------------------------------------------------------------------------

const HALF = (() => {
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >> 10) & 0x1f;
    const fraction = h & 0x3ff;
    if (exponent === 0) table[h] = sign * fraction * 2 ** -24;
    else if (exponent === 31) table[h] = fraction ? NaN : sign * Infinity;
    else table[h] = sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
  }
  return table;
})();

function halfToFloat(buffer) {
  const half = new Uint16Array(buffer);
  const out = new Float32Array(half.length);
  for (let i = 0; i < half.length; i++) out[i] = HALF[half[i]];
  return out;
}

// ---- loading ----------------------------------------------------------------------------------

async function fetchOk(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = (await response.json()).error?.message ?? message; } catch { /* not JSON */ }
    throw new Error(`${url}: ${message}`);
  }
  return response;
}

async function loadRuntime() {
  const runtime = await (await fetchOk('/ui-static/runtime.json')).json();
  let adapter = null;
  if (navigator.gpu) adapter = await navigator.gpu.requestAdapter().catch(() => null);
  api.backend = adapter ? 'webgpu' : 'wasm';
  ort = await import(`${runtime.ort}${adapter ? 'ort.webgpu.min.mjs' : 'ort.wasm.min.mjs'}`);
  ort.env.wasm.wasmPaths = runtime.ort;
  // Threads need a cross-origin-isolated page; one thread is what the decoder needs anyway.
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency) : 1;
  providers = adapter ? ['webgpu', 'wasm'] : ['wasm'];
  const described = await (await fetchOk('/v1/segment/decoder')).json();
  for (const [multimask, graph] of [[true, described.multimask], [false, described.single]]) {
    const bytes = new Uint8Array(await (await fetchOk(graph.url)).arrayBuffer());
    graphs[multimask] = await ort.InferenceSession.create(bytes, {executionProviders: providers});
  }
}

function embedding(sessionId) {
  if (!embeddings.has(sessionId)) {
    const started = performance.now();
    const loading = fetchOk(`/v1/sessions/${sessionId}/embedding`).then(async (response) => {
      const dtype = response.headers.get('X-Embedding-Dtype');
      const shape = response.headers.get('X-Embedding-Shape');
      if (dtype !== 'float16' || shape !== '1,256,64,64') {
        throw new Error(`unexpected embedding ${dtype} ${shape}`);
      }
      const buffer = await response.arrayBuffer();
      api.stats.embeddingBytes = buffer.byteLength;
      api.stats.embeddingMs.push(performance.now() - started);
      return halfToFloat(buffer);
    });
    loading.catch(() => embeddings.delete(sessionId));  // retried on the next click
    embeddings.clear();  // one image at a time per tab
    embeddings.set(sessionId, loading);
  }
  return embeddings.get(sessionId);
}

// ---- the decoder (stages/segment.py: decoder_prompt, in the same float64 steps) ----------------

function preprocessShape(height, width) {
  const scale = 1024 / Math.max(height, width);
  return [Math.floor(height * scale + 0.5), Math.floor(width * scale + 0.5)];
}

function feeds(image, height, width, prompt, maskLogits) {
  const coords = [];
  const labels = [];
  (prompt.points ?? []).forEach(([x, y], i) => { coords.push(x, y); labels.push(prompt.labels[i]); });
  if (prompt.box) {
    coords.push(...prompt.box);
    labels.push(2, 3);
  } else {
    coords.push(0, 0);
    labels.push(-1);
  }
  const [newHeight, newWidth] = preprocessShape(height, width);
  const sx = newWidth / width;
  const sy = newHeight / height;
  const scaled = new Float32Array(coords.length);
  for (let i = 0; i < coords.length; i += 2) {
    scaled[i] = coords[i] * sx;
    scaled[i + 1] = coords[i + 1] * sy;
  }
  const n = labels.length;
  return {
    image_embeddings: new ort.Tensor('float32', image, [1, 256, 64, 64]),
    point_coords: new ort.Tensor('float32', scaled, [1, n, 2]),
    point_labels: new ort.Tensor('float32', Float32Array.from(labels), [1, n]),
    mask_input: new ort.Tensor('float32', maskLogits ?? new Float32Array(LOW_RES * LOW_RES),
                               [1, 1, LOW_RES, LOW_RES]),
    has_mask_input: new ort.Tensor('float32', Float32Array.of(maskLogits ? 1 : 0), [1]),
    orig_im_size: new ort.Tensor('int64', BigInt64Array.of(BigInt(height), BigInt(width)), [2]),
  };
}

// Decodes one prompt: per candidate its (H*W) 0/1 mask, score and low-res logits.
async function decode(sessionId, height, width, prompt, maskLogits = null, multimask = true) {
  const image = await embedding(sessionId);
  const run = runs.then(() => graphs[multimask].run(feeds(image, height, width, prompt, maskLogits)));
  runs = run.catch(() => {});
  const out = await run;
  const count = out.iou_predictions.dims[1];
  const pixels = height * width;
  const masks = out.masks.data;
  const low = out.low_res_masks.data;
  const result = [];
  for (let k = 0; k < count; k++) {
    result.push({
      mask: masks.subarray(k * pixels, (k + 1) * pixels),
      score: out.iou_predictions.data[k],
      lowRes: low.slice(k * LOW_RES * LOW_RES, (k + 1) * LOW_RES * LOW_RES),
    });
  }
  return result;
}

// COCO's uncompressed RLE (column-major runs, starting with a run of zeros).
function rleCounts(mask, height, width) {
  const counts = [];
  let value = 0;
  let run = 0;
  for (let x = 0; x < width; x++) {
    for (let y = 0; y < height; y++) {
      const bit = mask[y * width + x] ? 1 : 0;
      if (bit !== value) { counts.push(run); run = 0; value = bit; }
      run++;
    }
  }
  counts.push(run);
  return counts;
}

function best(candidates) {
  let index = 0;
  candidates.forEach((c, i) => { if (c.score > candidates[index].score) index = i; });
  return index;
}

// For the tests and the benchmark: decode a prompt (after `refineFrom`, if given, whose chosen
// candidate's logits it refines) and return the masks as RLE counts.
api.decode = async (sessionId, height, width, prompt, options = {}) => {
  let logits = null;
  if (options.refineFrom) {
    const first = await decode(sessionId, height, width, options.refineFrom.prompt);
    logits = first[options.refineFrom.chosen].lowRes;
  }
  const started = performance.now();
  const candidates = await decode(sessionId, height, width, prompt, logits,
                                  options.multimask ?? true);
  return {
    ms: performance.now() - started,
    scores: candidates.map((c) => c.score),
    counts: candidates.map((c) => rleCounts(c.mask, height, width)),
  };
};

// ---- the tab ------------------------------------------------------------------------------------

let modeText = '';

// The line above the image that says where clicks are decoded (kept there as Gradio re-renders).
function modeLine(text) {
  if (text !== undefined) modeText = text;
  const overlay = document.getElementById('overlay');
  if (!overlay || !modeText) return;
  let line = document.getElementById(MODE_LINE_ID);
  if (!line) {
    line = document.createElement('div');
    line.id = MODE_LINE_ID;
    line.style.cssText = 'font-size: 0.85em; opacity: 0.8; margin: 2px 0;';
    overlay.parentElement.insertBefore(line, overlay);
  }
  if (line.textContent !== modeText) line.textContent = modeText;
}

function fallBack(reason) {
  api.mode = 'server';
  api.reason = reason;
  modeLine(`Clicks run on the server: the browser cannot decode (${reason}).`);
}

function clickMode() {
  const checked = document.querySelector('#click-mode input:checked');
  const text = checked ? `${checked.value} ${checked.parentElement?.textContent ?? ''}` : '';
  if (text.includes('box')) return 'box';
  if (text.includes('remove')) return 'remove';
  return 'add';
}

function overlayImage() {
  return document.querySelector('#overlay img');
}

// Image pixel under the pointer, computed as Gradio computes a click's index on an image (scaled
// to fit and centred, never enlarged), so both paths put a click on the same pixel.
function imagePoint(img, event) {
  const rect = img.getBoundingClientRect();
  const scale = Math.min(rect.width / img.naturalWidth, rect.height / img.naturalHeight, 1);
  const left = (rect.width - img.naturalWidth * scale) / 2;
  const top = (rect.height - img.naturalHeight * scale) / 2;
  const x = Math.round((event.clientX - rect.left - left) / scale);
  const y = Math.round((event.clientY - rect.top - top) / scale);
  if (x < 0 || x >= img.naturalWidth || y < 0 || y >= img.naturalHeight) return null;
  return [x, y];
}

function canvasFor(img) {
  let canvas = document.getElementById('browser-overlay');
  const parent = img.parentElement;
  if (!canvas || canvas.parentElement !== parent) {
    canvas?.remove();
    canvas = document.createElement('canvas');
    canvas.id = 'browser-overlay';
    canvas.style.cssText = 'position: absolute; pointer-events: none;';
    if (getComputedStyle(parent).position === 'static') parent.style.position = 'relative';
    parent.appendChild(canvas);
  }
  const rect = img.getBoundingClientRect();
  const parentRect = parent.getBoundingClientRect();
  const scale = Math.min(rect.width / img.naturalWidth, rect.height / img.naturalHeight, 1);
  const shownWidth = img.naturalWidth * scale;
  const shownHeight = img.naturalHeight * scale;
  canvas.style.left = `${rect.left - parentRect.left + (rect.width - shownWidth) / 2}px`;
  canvas.style.top = `${rect.top - parentRect.top + (rect.height - shownHeight) / 2}px`;
  canvas.style.width = `${shownWidth}px`;
  canvas.style.height = `${shownHeight}px`;
  if (canvas.width !== view.width || canvas.height !== view.height) {
    canvas.width = view.width;
    canvas.height = view.height;
  }
  return canvas;
}

// The status line's hint while a box has its first corner only, as the server path says it (the
// server's next status replaces the whole line, hint included).
function cornerHint(shown) {
  const status = document.getElementById('status');
  const hint = document.getElementById(CORNER_HINT_ID);
  if (!shown) {
    hint?.remove();
    return;
  }
  if (!status || hint) return;
  const line = document.createElement('span');
  line.id = CORNER_HINT_ID;
  line.textContent = ' · click the opposite corner of the box';
  (status.querySelector('p') ?? status).appendChild(line);
}

function draw() {
  cornerHint(Boolean(corner) && !dragTo);
  const img = overlayImage();
  if (!img || !view.width) return;
  const canvas = canvasFor(img);
  const context = canvas.getContext('2d');
  const pixels = context.createImageData(view.width, view.height);
  const data = pixels.data;
  for (const [layer, alpha] of [[hoverMask, 90], [committed?.mask, 140]]) {
    if (!layer) continue;
    for (let i = 0; i < layer.length; i++) {
      if (!layer[i]) continue;
      data[4 * i] = COLOUR[0];
      data[4 * i + 1] = COLOUR[1];
      data[4 * i + 2] = COLOUR[2];
      data[4 * i + 3] = Math.max(data[4 * i + 3], alpha);
    }
  }
  context.putImageData(pixels, 0, 0);
  if (corner) {
    context.strokeStyle = 'rgb(255, 220, 0)';
    context.lineWidth = Math.max(2, view.width / 200);
    const r = Math.max(6, Math.min(view.width, view.height) / 32);
    context.beginPath();
    context.moveTo(corner[0] - r, corner[1]);
    context.lineTo(corner[0] + r, corner[1]);
    context.moveTo(corner[0], corner[1] - r);
    context.lineTo(corner[0], corner[1] + r);
    if (dragTo) {
      context.rect(Math.min(corner[0], dragTo[0]), Math.min(corner[1], dragTo[1]),
                   Math.abs(dragTo[0] - corner[0]), Math.abs(dragTo[1] - corner[1]));
    }
    context.stroke();
  }
}

function maskLogitsFor(state) {
  if (state.selected === null || state.selected === undefined) return null;
  const logits = lowResByStep.get(`${state.object_id}:${state.step}`);
  return logits ? logits[state.selected] : null;  // a step decoded elsewhere: a fresh decode
}

function nextPrompt(point, mode) {
  const points = [...(view.points ?? [])];
  const labels = [...(view.labels ?? [])];
  let box = view.box ?? null;
  if (mode === 'box') {
    const [x0, y0] = corner;
    box = [Math.min(x0, point[0]), Math.min(y0, point[1]), Math.max(x0, point[0]),
           Math.max(y0, point[1])];
  } else {
    points.push(point);
    labels.push(mode === 'remove' ? 0 : 1);
  }
  return {points, labels, box};
}

function decodesHere() {
  return api.mode === 'browser' && view.session_id && embeddings.has(view.session_id);
}

async function onClick(event) {
  const img = overlayImage();
  if (!img || event.target !== img) return;
  if (swallowClick) {  // the end of a drag: its box is already being decoded
    swallowClick = false;
    event.stopPropagation();
    event.preventDefault();
    return;
  }
  if (!decodesHere()) return;
  const point = imagePoint(img, event);
  if (!point) return;
  // Ours from here: the server's click handler must not decode it too.
  event.stopPropagation();
  event.preventDefault();
  const mode = clickMode();
  if (mode === 'box' && !corner) {
    corner = point;
    draw();
    return;
  }
  if (mode === 'box' && (corner[0] === point[0] || corner[1] === point[1])) {
    corner = null;
    draw();
    return;
  }
  await commit(point, mode, performance.now());
}

// A box dragged out on the image, whatever the click mode (as in SAM's demo); two corner clicks
// in the box mode still work, and so does every click on the server path.
function onPress(event) {
  const img = overlayImage();
  if (event.button !== 0 || !img || event.target !== img || !decodesHere()) return;
  const point = imagePoint(img, event);
  if (!point) return;
  event.preventDefault();  // no native drag of the image, which would swallow the moves
  dragStart = {point, x: event.clientX, y: event.clientY, moved: false};
}

function onDrag(event) {
  if (!dragStart) return;
  if (!dragStart.moved && Math.hypot(event.clientX - dragStart.x,
                                     event.clientY - dragStart.y) < DRAG_PX) return;
  dragStart.moved = true;
  corner = dragStart.point;
  dragTo = clampedPoint(overlayImage(), event);
  hoverMask = null;
  draw();
}

async function onRelease(event) {
  const drag = dragStart;
  dragStart = null;
  if (!drag?.moved) return;
  swallowClick = true;
  setTimeout(() => { swallowClick = false; }, 0);  // a release off the image makes no click
  const end = clampedPoint(overlayImage(), event);
  dragTo = null;
  if (!end || end[0] === corner[0] || end[1] === corner[1]) {
    corner = null;
    draw();
    return;
  }
  await commit(end, 'box', performance.now());
}

function clampedPoint(img, event) {
  if (!img) return null;
  const rect = img.getBoundingClientRect();
  const scale = Math.min(rect.width / img.naturalWidth, rect.height / img.naturalHeight, 1);
  const left = rect.left + (rect.width - img.naturalWidth * scale) / 2;
  const top = rect.top + (rect.height - img.naturalHeight * scale) / 2;
  const x = Math.round((event.clientX - left) / scale);
  const y = Math.round((event.clientY - top) / scale);
  return [Math.min(Math.max(x, 0), img.naturalWidth - 1),
          Math.min(Math.max(y, 0), img.naturalHeight - 1)];
}

// Decodes the prompt the click (or the box from ``corner``) makes, draws it, records the step.
async function commit(point, mode, started) {
  const prompt = nextPrompt(point, mode);
  corner = null;
  hoverMask = null;
  const state = view;
  try {
    const candidates = await decode(state.session_id, state.height, state.width, prompt,
                                    maskLogitsFor(state));
    const chosen = best(candidates);
    committed = {mask: candidates[chosen].mask};
    draw();
    api.stats.overlayAt = performance.now();
    api.stats.clicks += 1;
    api.stats.clickMs.push(performance.now() - started);
    const response = await fetchOk(
      `/v1/sessions/${state.session_id}/objects/${state.object_id}/steps`, {
        method: 'POST',
        headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({
          ...prompt,
          masks: candidates.map((c) => ({
            rle: {size: [state.height, state.width],
                  counts: rleCounts(c.mask, state.height, state.width)},
            score: c.score,
          })),
          selected: chosen,
        }),
      });
    const recorded = await response.json();
    lowResByStep.set(`${state.object_id}:${recorded.step}`, candidates.map((c) => c.lowRes));
    view = {...state, ...recorded, points: recorded.points, object_id: state.object_id};
    api.lastRecorded = recorded;
    document.getElementById('browser-sync')?.click();
  } catch (error) {
    committed = null;
    draw();
    fallBack(`${error.message ?? error}`);
  }
}

async function onHover(event) {
  if (api.mode !== 'browser' || !view.session_id || corner || dragStart
      || clickMode() !== 'add') return;
  const img = overlayImage();
  if (!img || event.target !== img || !embeddings.has(view.session_id)) return;
  hoverPoint = imagePoint(img, event);
  if (hovering || !hoverPoint) return;
  hovering = true;
  try {
    while (hoverPoint) {  // the latest position wins; positions passed meanwhile are skipped
      const point = hoverPoint;
      hoverPoint = null;
      const started = performance.now();
      const state = view;
      const candidates = await decode(state.session_id, state.height, state.width,
                                      nextPrompt(point, 'add'), maskLogitsFor(state));
      if (state !== view) break;
      hoverMask = candidates[best(candidates)].mask;
      draw();
      api.stats.hovers += 1;
      api.stats.hoverMs.push(performance.now() - started);
    }
  } catch (error) {
    fallBack(`${error.message ?? error}`);
  } finally {
    hovering = false;
  }
}

function onLeave() {
  hoverPoint = null;
  hoverMask = null;
  draw();
}

// The tab's object, as the server last rendered it (new image, other object, undo/redo, ...).
function watchState() {
  modeLine();
  const box = document.querySelector(STATE_SELECTOR);
  if (!box || box.value === viewText) return;
  viewText = box.value;
  let next = {};
  try { next = JSON.parse(viewText); } catch { return; }
  if (next.object_id !== view.object_id || next.step !== view.step) {
    corner = null;
    hoverMask = null;
  }
  if (next.corner) corner = next.corner;
  view = next;
  committed = null;  // the server's overlay shows the recorded step from here on
  if (api.mode === 'browser' && view.session_id) {
    embedding(view.session_id).catch((error) => fallBack(`${error.message ?? error}`));
  }
  draw();
}

async function start() {
  try {
    if (typeof WebAssembly !== 'object') throw new Error('no WebAssembly');
    await loadRuntime();
    api.mode = 'browser';
    modeLine(`Clicks are decoded in this browser (${api.backend}); the server records each step.`);
  } catch (error) {
    fallBack(`${error.message ?? error}`);
  }
  api.ready = true;
}

// Capture phase: a click the browser decodes never reaches Gradio's own click handler.
document.addEventListener('click', onClick, true);
document.addEventListener('mousedown', onPress, true);
document.addEventListener('mousemove', onDrag, true);
document.addEventListener('mouseup', onRelease, true);
document.addEventListener('mousemove', onHover, true);
document.addEventListener('mouseout', (event) => { if (event.target === overlayImage()) onLeave(); }, true);
setInterval(watchState, 100);
api.started = start();
