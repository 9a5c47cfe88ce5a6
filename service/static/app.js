// deepserve playground: plain ES2020, no build step, no framework. Every panel calls the
// public HTTP API (the same requests a client makes); nothing is loaded from another origin.
"use strict";

const byId = (id) => document.getElementById(id);
const SIZE = 28; // every image model works on 28×28 grey images
const KEY_STORE = "deepserve-api-key";
const MORPH_STEPS = 9;

// ------------------------------------------------------------------ the API, with its key

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

const auth = { form: byId("auth"), input: byId("api-key"), message: byId("auth-message"), waiting: null };

function askForKey(rejected) {
  if (!auth.waiting) {
    auth.waiting = new Promise((resolve) => {
      auth.resolve = resolve;
      auth.message.textContent = rejected
        ? "That API key was not accepted. Enter the right one:"
        : "This server requires an API key (it is kept in this browser tab only).";
      auth.form.hidden = false;
      auth.input.focus();
    });
  }
  return auth.waiting;
}

auth.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = auth.input.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  auth.input.value = "";
  auth.form.hidden = true;
  const resolve = auth.resolve;
  auth.waiting = null;
  resolve();
});

// GET (no body), POST JSON (json) or POST multipart (form); answers JSON, a Blob with
// blob: true, or the Response itself with raw: true. A 401 asks for the API key and tries again.
async function api(path, { json, form, blob = false, raw = false } = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORE);
    const headers = key ? { Authorization: `Bearer ${key}` } : {};
    const init = { method: json || form ? "POST" : "GET", headers };
    if (json) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    } else if (form) {
      init.body = form;
    }
    const res = await fetch(path, init);
    if (res.status === 401) {
      // a key entered while this request was on its way is tried before asking again
      if (sessionStorage.getItem(KEY_STORE) === key) await askForKey(Boolean(key));
      continue;
    }
    if (!res.ok) {
      let message = `${res.status} ${res.statusText}`;
      try {
        message = (await res.json()).error || message;
      } catch {
        // not a JSON error body: keep the status line
      }
      throw new ApiError(message, res.status);
    }
    if (raw) return res;
    return blob ? res.blob() : res.json();
  }
}

// The picture as it is (the server frames it the way the model's training set was made),
// asking for the 28×28 input the model received in return.
function imageForm(blob, fields = {}) {
  const form = new FormData();
  form.append("image", blob, "image.png");
  for (const [name, value] of Object.entries({ ...fields, return_input: "true" })) form.append(name, value);
  return form;
}

// ------------------------------------------------------------------ panels: busy state, errors, latest answer wins

const busyCount = new Map();

function setBusy(panel, delta) {
  const n = (busyCount.get(panel) || 0) + delta;
  busyCount.set(panel, n);
  panel.setAttribute("aria-busy", String(n > 0));
}

// A runner for one kind of work in a panel: only the latest call's answer is shown, and
// its error (if any) goes to the panel's (or the given) error line.
function runner(panelId, error) {
  const panel = byId(panelId);
  const line = error || panel.querySelector(":scope > .error");
  let latest = 0;
  return async (work) => {
    const ticket = ++latest;
    setBusy(panel, +1);
    try {
      const show = await work();
      if (ticket === latest) {
        line.textContent = "";
        if (show) show();
      }
    } catch (err) {
      if (ticket === latest) line.textContent = err instanceof ApiError ? err.message : `error: ${err.message}`;
    } finally {
      setBusy(panel, -1);
    }
  };
}

// At most one call per `ms` while events keep coming (drawing), the last state included.
function throttle(fn, ms) {
  let timer = 0;
  const call = () => {
    if (!timer) {
      timer = setTimeout(() => {
        timer = 0;
        fn();
      }, ms);
    }
  };
  call.cancel = () => {
    clearTimeout(timer);
    timer = 0;
  };
  return call;
}

// One call, `ms` after the events stop (typing, sliders).
function debounce(fn, ms) {
  let timer = 0;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// ------------------------------------------------------------------ result rendering

const percent = (p) => `${(p * 100).toFixed(1)}%`;

function showBars(list, topK) {
  list.replaceChildren(
    ...topK.map(({ label, probability }) => {
      const item = document.createElement("li");
      const name = document.createElement("span");
      const track = document.createElement("span");
      const fill = document.createElement("span");
      const value = document.createElement("span");
      name.className = "name";
      track.className = "track";
      fill.className = "fill";
      value.className = "value";
      name.textContent = label;
      fill.style.width = `${Math.max(0.5, probability * 100)}%`;
      value.textContent = percent(probability);
      track.append(fill);
      item.append(name, track, value);
      return item;
    }),
  );
}

// The out-of-distribution flag, where the server sends one.
function showOod(element, answer, what) {
  if (typeof answer.in_distribution !== "boolean") {
    element.hidden = true;
    return;
  }
  const score = typeof answer.ood_score === "number" ? ` (OOD score ${answer.ood_score.toFixed(2)})` : "";
  element.hidden = false;
  element.classList.toggle("bad", !answer.in_distribution);
  element.textContent = answer.in_distribution
    ? `✓ looks like ${what}${score}`
    : `⚠ does not look like ${what}: don't trust this answer${score}`;
}

function showClassification(prefix, answer, what) {
  byId(`${prefix}-result`).textContent = answer.label;
  showBars(byId(`${prefix}-bars`), answer.top_k);
  showOod(byId(`${prefix}-ood`), answer, what);
  showSeen(byId(`${prefix}-seen`), answer.input_png);
}

function resetClassification(prefix) {
  byId(`${prefix}-result`).textContent = "–";
  byId(`${prefix}-bars`).replaceChildren();
  byId(`${prefix}-ood`).hidden = true;
  showSeen(byId(`${prefix}-seen`));
}

const dataUrl = (b64) => `data:image/png;base64,${b64}`;
const blobOf = (b64) => new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], { type: "image/png" });

// "What the model saw": the 28×28 input (base64 PNG) the server made of the picture sent;
// none (a cleared panel, or a server without return_input) hides the image.
function showSeen(img, b64) {
  if (b64) img.src = dataUrl(b64);
  else img.removeAttribute("src");
}

// Show a Blob in an <img>, freeing the previous one's object URL.
function showBlob(img, blob) {
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  img.dataset.url = URL.createObjectURL(blob);
  img.src = img.dataset.url;
}

// ------------------------------------------------------------------ 28×28 grey images in the page

function newCanvas(width, height = width) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}

const context = (canvas) => canvas.getContext("2d", { willReadFrequently: true });

// The grey levels (0–255) of a canvas whose pixels are grey.
function greyOf(canvas) {
  const rgba = context(canvas).getImageData(0, 0, canvas.width, canvas.height).data;
  const grey = new Uint8Array(canvas.width * canvas.height);
  for (let i = 0; i < grey.length; i++) grey[i] = rgba[4 * i];
  return grey;
}

function paintGrey(canvas, grey) {
  const ctx = context(canvas);
  const image = ctx.createImageData(canvas.width, canvas.height);
  for (let i = 0; i < grey.length; i++) {
    image.data.set([grey[i], grey[i], grey[i], 255], 4 * i);
  }
  ctx.putImageData(image, 0, 0);
}

const pngOf = (canvas) => new Promise((resolve) => canvas.toBlob(resolve, "image/png"));

async function greyOfBlob(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = newCanvas(bitmap.width, bitmap.height);
  context(canvas).drawImage(bitmap, 0, 0);
  bitmap.close();
  return greyOf(canvas);
}

// Peak signal-to-noise ratio (dB) of two grey images of the same size.
function psnr(a, b) {
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += ((a[i] - b[i]) / 255) ** 2;
  return 10 * Math.log10(1 / Math.max(sum / a.length, 1e-12));
}

// Any image -> a 28×28 canvas (the samples and model inputs are 28×28 already).
async function canvas28(blob) {
  const bitmap = await createImageBitmap(blob);
  const small = newCanvas(SIZE);
  context(small).drawImage(bitmap, 0, 0, SIZE, SIZE);
  bitmap.close();
  return small;
}

// ------------------------------------------------------------------ a canvas to draw on

class DrawPad {
  constructor(canvas, onChange) {
    this.canvas = canvas;
    this.ctx = context(canvas);
    this.onChange = onChange; // onChange(done): done is false while a stroke goes on
    this.drawing = false;
    this.clear(false);
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    canvas.addEventListener("pointerup", () => this.up());
    canvas.addEventListener("pointercancel", () => this.up());
    canvas.addEventListener("keydown", (e) => {
      if (e.key === "Delete" || e.key === "Backspace") {
        e.preventDefault();
        this.clear();
      }
    });
  }

  point(e) {
    const r = this.canvas.getBoundingClientRect();
    return [((e.clientX - r.left) * this.canvas.width) / r.width, ((e.clientY - r.top) * this.canvas.height) / r.height];
  }

  down(e) {
    e.preventDefault();
    try {
      this.canvas.setPointerCapture(e.pointerId);
    } catch {
      // synthetic pointers cannot always be captured; drawing works without it
    }
    this.drawing = true;
    this.last = this.point(e);
    this.line(this.last, this.last);
    this.onChange(false);
  }

  move(e) {
    if (!this.drawing) return;
    const p = this.point(e);
    this.line(this.last, p);
    this.last = p;
    this.onChange(false);
  }

  up() {
    if (!this.drawing) return;
    this.drawing = false;
    this.onChange(true);
  }

  line([x0, y0], [x1, y1]) {
    const ctx = this.ctx;
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = this.canvas.width * 0.11; // MNIST-thick (about 3 px) once the server makes the digit 20 px
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(x0, y0);
    ctx.lineTo(x1, y1);
    ctx.stroke();
    this.empty = false;
  }

  clear(notify = true) {
    this.ctx.fillStyle = "#000";
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.empty = true;
    if (notify) this.onChange(true);
  }

  // An uploaded picture on the pad, whole and centred (the file itself is what is sent).
  show(bitmap) {
    const { width, height } = this.canvas;
    const scale = Math.min(width / bitmap.width, height / bitmap.height);
    const [w, h] = [bitmap.width * scale, bitmap.height * scale];
    this.clear(false);
    this.ctx.imageSmoothingEnabled = scale < 1; // a small image keeps its pixels
    this.ctx.drawImage(bitmap, (width - w) / 2, (height - h) / 2, w, h);
    this.ctx.imageSmoothingEnabled = true;
    this.empty = false;
  }

  // The pad as it is, a PNG of its full size (the server frames the drawing, not the page);
  // the promise of it, or null when nothing is drawn.
  png() {
    return this.empty ? null : pngOf(this.canvas);
  }
}

// ------------------------------------------------------------------ digits

const digits = {
  run: runner("digits"),
  pad: new DrawPad(byId("digit-canvas"), (done) => {
    if (done) {
      digits.classifySoon.cancel();
      digits.classifyNow();
    } else {
      digits.classifySoon();
    }
  }),

  classifyNow() {
    digits.run(async () => {
      const png = digits.pad.png();
      if (!png) return () => resetClassification("digit");
      const answer = await api("/classify", { form: imageForm(await png, { model: "digits", top_k: 3 }) });
      return () => showClassification("digit", answer, "a handwritten digit");
    });
  },
};
digits.classifySoon = throttle(digits.classifyNow, 150); // the answer follows the pen
byId("digit-clear").addEventListener("click", () => digits.pad.clear());

// ------------------------------------------------------------------ fashion

const sampleBlob = (name) => fetch(`/static/samples/${name}.png`).then((res) => res.blob());

const fashion = {
  run: runner("fashion"),

  // source: a Blob (an upload) or the promise of one (a bundled sample)
  classify(source) {
    fashion.run(async () => {
      const blob = await source;
      showBlob(byId("fashion-preview"), blob);
      const answer = await api("/classify", { form: imageForm(blob, { model: "fashion", top_k: 3 }) });
      return () => showClassification("fashion", answer, "a Fashion-MNIST garment");
    });
  },
};

byId("fashion-upload").addEventListener("change", (e) => {
  if (e.target.files.length) fashion.classify(e.target.files[0]);
});
const drop = byId("fashion-drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const file = e.dataTransfer.files[0];
  if (file) fashion.classify(file);
});

// Sample buttons (fashion and denoiser) show their own image.
for (const button of document.querySelectorAll("button.sample")) {
  const img = document.createElement("img");
  img.src = `/static/samples/${button.dataset.sample || button.dataset.digit}.png`;
  img.alt = "";
  button.append(img);
  if (button.dataset.sample) button.addEventListener("click", () => fashion.classify(sampleBlob(button.dataset.sample)));
}

// ------------------------------------------------------------------ sentiment

const sentiment = {
  run: runner("sentiment"),
  input: byId("sentiment-input"),

  classifyNow() {
    const text = sentiment.input.value.trim();
    sentiment.run(async () => {
      if (!text) {
        return () => {
          byId("sentiment-result").textContent = "–";
          delete byId("sentiment-result").dataset.label;
          byId("sentiment-bars").replaceChildren();
          byId("sentiment-note").textContent = "";
        };
      }
      const answer = await api("/classify", { json: { text } });
      return () => {
        const result = byId("sentiment-result");
        result.textContent = answer.label;
        result.dataset.label = answer.label;
        showBars(byId("sentiment-bars"), answer.top_k);
        const notes = [];
        if (typeof answer.unknown_token_rate === "number") {
          notes.push(`${Math.round(answer.unknown_token_rate * 100)}% of the words are unknown to the model`);
        }
        if (answer.in_distribution === false) notes.push("⚠ this text is unlike the film reviews it learned from");
        byId("sentiment-note").textContent = notes.join(" · ");
      };
    });
  },
};
sentiment.input.addEventListener("input", debounce(sentiment.classifyNow, 200));

// ------------------------------------------------------------------ generator and morphs

const generator = {
  run: runner("generator"),
  digit: byId("generate-digit"),
  seed: byId("generate-seed"),
  seedTo: byId("morph-seed-to"),
  digitTo: byId("morph-digit-to"),

  values() {
    const seed = Math.max(0, Math.floor(Number(generator.seed.value) || 0));
    const seedTo = Math.max(0, Math.floor(Number(generator.seedTo.value) || 0));
    return { digit: Number(generator.digit.value), seed, digitTo: Number(generator.digitTo.value), seedTo };
  },

  generate() {
    const { digit, seed } = generator.values();
    byId("morph-seed-from").textContent = seed;
    byId("morph-digit-from").textContent = digit;
    generator.run(async () => {
      const grid = await api("/generate", { json: { n: 16, digit, seed }, blob: true });
      return () => {
        const img = byId("generate-output");
        showBlob(img, grid);
        img.alt = `16 generated images of the digit ${digit}, seed ${seed}`;
      };
    });
    generator.morphs();
  },

  morphs() {
    const { digit, seed, digitTo, seedTo } = generator.values();
    seedMorph.load({ digit, seed }, { digit, seed: seedTo });
    digitMorph.load({ digit, seed }, { digit: digitTo, seed });
  },
};

// A slider over frames fetched once per pair of endpoints: moving it requests nothing.
class Morph {
  constructor(kind) {
    this.slider = byId(`morph-${kind}-slider`);
    this.output = byId(`morph-${kind}-output`);
    this.strip = byId(`morph-${kind}-strip`);
    this.run = runner("generator", this.slider.closest("fieldset").querySelector(".error"));
    this.frames = [];
    this.key = "";
    this.slider.max = String(MORPH_STEPS - 1);
    this.slider.addEventListener("input", () => this.show());
  }

  load(from, to) {
    const key = JSON.stringify([from, to]);
    if (key === this.key) return;
    this.key = key;
    this.run(async () => {
      const body = { ...from, morph_to: to, steps: MORPH_STEPS, format: "json" };
      const answer = await api("/generate", { json: body }).catch((err) => {
        this.key = ""; // try again on the next change
        throw err;
      });
      return () => {
        this.frames = answer.images.map(dataUrl);
        this.slider.max = String(this.frames.length - 1);
        this.strip.replaceChildren(
          ...this.frames.map((src) => {
            const img = document.createElement("img");
            img.src = src;
            img.alt = "";
            return img;
          }),
        );
        this.show();
      };
    });
  }

  show() {
    const i = Math.min(Number(this.slider.value), this.frames.length - 1);
    if (i < 0) return;
    this.output.src = this.frames[i];
    this.slider.setAttribute("aria-valuetext", `frame ${i + 1} of ${this.frames.length}`);
    this.strip.querySelectorAll("img").forEach((img, j) => img.classList.toggle("current", j === i));
  }
}

const seedMorph = new Morph("seed");
const digitMorph = new Morph("digit");

for (const select of [generator.digit, generator.digitTo]) {
  for (let d = 0; d <= 9; d++) select.add(new Option(String(d), String(d)));
}
generator.digit.value = "3";
generator.digitTo.value = "8";
byId("generate-button").addEventListener("click", generator.generate);
generator.digit.addEventListener("change", generator.generate);
generator.seed.addEventListener("change", generator.generate);
generator.seedTo.addEventListener("change", generator.morphs);
generator.digitTo.addEventListener("change", generator.morphs);

// ------------------------------------------------------------------ codec

const codec = {
  run: runner("codec"),

  // input: { png: the picture to send (a Blob, the promise of one, or null: clears the
  // panel), fileBytes: the uploaded file's size, absent for a drawing }, or the promise of one
  use(input) {
    codec.run(async () => {
      const { png: source, fileBytes } = await input;
      const png = await source;
      if (!png) {
        return () => {
          showSeen(byId("codec-seen"));
          byId("codec-code").textContent = "–";
          byId("codec-stats").textContent = "";
          byId("codec-output").removeAttribute("src");
        };
      }
      const { code, bytes, original_bytes: pixels, input_png: seen } = await api("/compress", { form: imageForm(png) });
      const decoded = await api("/decompress", { json: { code }, blob: true });
      // the reconstruction against what the encoder received (a server without return_input: no PSNR)
      const quality = seen ? psnr(await greyOfBlob(blobOf(seen)), await greyOfBlob(decoded)) : null;
      const hex = [...atob(code)].map((c) => c.charCodeAt(0).toString(16).padStart(2, "0")).join(" ");
      const pngBytes = fileBytes || (seen ? atob(seen).length : png.size); // a drawing: the 28×28 PNG the model saw
      return () => {
        showSeen(byId("codec-seen"), seen);
        byId("codec-code").textContent = hex;
        showBlob(byId("codec-output"), decoded);
        byId("codec-stats").textContent =
          `${bytes} bytes of code · ${pixels} bytes of pixels · ${pngBytes} bytes of PNG ` +
          `(${(pngBytes / bytes).toFixed(0)}× the code)` +
          (quality === null ? "" : ` · PSNR ${quality.toFixed(1)} dB`);
      };
    });
  },

  // an uploaded file (a Blob, or the promise of one): shown on the pad, then sent as it is
  upload(file) {
    codec.use(
      Promise.resolve(file).then(async (blob) => {
        const bitmap = await createImageBitmap(blob);
        codec.pad.show(bitmap);
        bitmap.close();
        return { png: blob, fileBytes: blob.size };
      }),
    );
  },
};
codec.pad = new DrawPad(byId("codec-canvas"), (done) => done && codec.use({ png: codec.pad.png() }));
byId("codec-clear").addEventListener("click", () => codec.pad.clear());
byId("codec-upload").addEventListener("change", (e) => {
  if (e.target.files.length) codec.upload(e.target.files[0]);
});

// ------------------------------------------------------------------ denoiser

// A fixed field of standard normal noise (seeded), so moving σ only scales it.
function normalNoise(n, seed) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0; // mulberry32
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - uniform()));
    const a = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(a);
    if (i + 1 < n) out[i + 1] = r * Math.sin(a);
  }
  return out;
}

const denoiser = {
  run: runner("denoiser"),
  sigma: byId("denoise-sigma"),
  noise: normalNoise(SIZE * SIZE, 7),
  clean: null, // grey levels of the clean 28×28 image

  // source: a 28×28 canvas, or the promise of one
  async use(source) {
    const panel = byId("denoiser");
    setBusy(panel, +1);
    try {
      denoiser.clean = greyOf(await source);
    } catch (err) {
      const line = panel.querySelector(":scope > .error");
      line.textContent = err instanceof ApiError ? err.message : `error: ${err.message}`;
      return;
    } finally {
      setBusy(panel, -1);
    }
    paintGrey(byId("denoise-clean"), denoiser.clean);
    denoiser.denoise();
  },

  sample: async (name) => canvas28(await sampleBlob(name)),

  // A drawing of any size -> the clean 28×28 image the denoiser's own framing makes of it
  // (its X-Model-Input): the page frames nothing itself.
  async framed(png) {
    const res = await api("/denoise", { form: imageForm(await png), raw: true });
    const seen = res.headers.get("X-Model-Input");
    if (!seen) throw new Error("this server does not send the model's input (return_input)");
    return canvas28(blobOf(seen));
  },

  denoise() {
    const sigma = Number(denoiser.sigma.value);
    if (!denoiser.clean) return;
    const clean = denoiser.clean;
    const noisy = clean.map((v, i) => Math.round(Math.min(1, Math.max(0, v / 255 + sigma * denoiser.noise[i])) * 255));
    const canvas = byId("denoise-noisy");
    paintGrey(canvas, noisy);
    byId("denoise-noisy-cap").textContent = sigma ? `noisy · ${psnr(clean, noisy).toFixed(1)} dB` : "noisy (σ = 0)";
    denoiser.run(async () => {
      const res = await api("/denoise", { form: imageForm(await pngOf(canvas)), raw: true });
      const seen = res.headers.get("X-Model-Input"); // the answer is the PNG: the input rides in a header
      const denoised = await res.blob();
      const quality = psnr(clean, await greyOfBlob(denoised));
      return () => {
        showBlob(byId("denoise-output"), denoised);
        showSeen(byId("denoise-seen"), seen);
        byId("denoise-output-cap").textContent = `denoised · ${quality.toFixed(1)} dB`;
      };
    });
  },
};
denoiser.sigma.addEventListener("input", () => {
  byId("denoise-sigma-value").textContent = Number(denoiser.sigma.value).toFixed(2);
});
denoiser.sigma.addEventListener("input", debounce(denoiser.denoise, 60));
for (const button of document.querySelectorAll("button[data-digit]")) {
  button.addEventListener("click", () => denoiser.use(denoiser.sample(button.dataset.digit)));
}
byId("denoise-mine").addEventListener("click", () => {
  const mine = digits.pad.png();
  if (mine) denoiser.use(denoiser.framed(mine));
  else byId("denoiser").querySelector(":scope > .error").textContent = "draw a digit in the Digits panel first";
});

// ------------------------------------------------------------------ models

function quality(metrics) {
  const parts = [];
  for (const [key, value] of Object.entries(metrics || {})) {
    if (typeof value !== "number" || parts.length === 2) continue;
    if (key.endsWith("accuracy")) parts.push(`${key.replace(/_/g, " ")} ${(value * 100).toFixed(1)}%`);
    else if (key.startsWith("psnr_db") && !key.includes("p10")) {
      const at = key.replace("psnr_db", "").replace("_sigma_", "σ ");
      parts.push(`PSNR${at ? ` ${at}` : ""} ${value.toFixed(1)} dB`);
    } else if (key === "inception_score") parts.push(`inception score ${value.toFixed(2)}`);
  }
  return parts.join(", ") || "–";
}

function loadModels() {
  runner("models")(async () => {
    const listing = await api("/models");
    const headers = [...byId("models-table").tHead.rows[0].cells].map((th) => th.textContent);
    return () => {
      const rows = listing.models.map((m) => {
        const row = document.createElement("tr");
        const provider = String(m.provider || "").replace("ExecutionProvider", "");
        const cells = [m.name, m.task, m.version, quality(m.metrics) + (m.meets_bars ? " ✓" : ""), provider];
        cells.forEach((text, i) => {
          const cell = document.createElement("td");
          cell.textContent = text;
          cell.dataset.label = headers[i]; // shown on narrow screens, where each row is a card
          row.append(cell);
        });
        row.cells[0].className = "strong";
        if (m.provider_reason) row.cells[4].title = m.provider_reason;
        return row;
      });
      byId("models-table").tBodies[0].replaceChildren(...rows);
      const b = listing.batching || {};
      byId("models-note").textContent =
        `${listing.models.length} models on ${listing.provider}; ` +
        (b.enabled ? `batching up to ${b.max_batch_size} rows` : "batching off") +
        "; ✓ meets its quality bars";
    };
  });
}

// ------------------------------------------------------------------ rollouts

const pct = (x) => (x == null ? "–" : `${+(x * 100).toFixed(1)}%`);

function showRollouts(listing) {
  const seen = new Map(); // one row per family (the codec's two models share one rollout)
  for (const m of listing.models) if (m.rollout && !seen.has(m.family)) seen.set(m.family, m.rollout);
  const headers = [...byId("rollouts-table").tHead.rows[0].cells].map((th) => th.textContent);
  const rows = [...seen].map(([family, r]) => {
    const s = r.summary || {};
    const split = `shadow ${pct(r.shadow)} · canary ${pct(r.canary)}`;
    const agree = s.agreement == null ? "nothing compared yet" : `${pct(s.agreement)} of ${s.evidence_requests} requests`;
    const decision = r.state === "running" ? (r.automatic ? "running: the policy decides" : "running") : r.state.replace("_", " ");
    const row = document.createElement("tr");
    [family, r.candidate, split, agree, decision + (r.reason ? ` (${r.reason})` : "")].forEach((text, i) => {
      const cell = document.createElement("td");
      cell.textContent = text;
      cell.dataset.label = headers[i];
      row.append(cell);
    });
    row.cells[0].className = "strong";
    row.dataset.state = r.state;
    return row;
  });
  byId("rollouts-table").tBodies[0].replaceChildren(...rows);
  const running = [...seen.values()].some((r) => r.state === "running");
  byId("rollouts-note").textContent = rows.length
    ? running ? "Updates every 2 s while a rollout runs." : "The last rollout's decision."
    : "No rollout yet: an operator starts one with the admin API (docs/operations.md).";
  return running;
}

async function pollRollouts() {
  try {
    setTimeout(pollRollouts, showRollouts(await api("/models")) ? 2000 : 10000);
  } catch (err) {
    byId("rollouts").querySelector(":scope > .error").textContent = String(err.message || err);
  }
}

// ------------------------------------------------------------------ start

loadModels();
pollRollouts();
sentiment.classifyNow();
fashion.classify(sampleBlob("ankle-boot"));
generator.generate();
codec.upload(sampleBlob("digit-2"));
denoiser.use(denoiser.sample("digit-7"));
