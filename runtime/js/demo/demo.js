// The demo page: photos per label (file picker, or the camera where there is one), held-out photos to measure,
// training in a worker with a progress bar and a loss curve, predictions; a reload continues from the state the
// worker keeps in OPFS.
import {WorkerTrainer} from "/dist/browser/client.js";
import {imagePixels} from "/dist/browser/index.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const trainer = new WorkerTrainer("/dist/browser/worker.js");
const photos = {train: new Map(), test: new Map()};
const losses = [];
let labels = [];

async function pixelsOf(files) {
  return Promise.all([...files].map(async (file) => ({pixels: await imagePixels(file), name: file.name})));
}

function addPhotos(part, label, items) {
  const list = photos[part].get(label) ?? [];
  list.push(...items.map((item) => ({...item, label})));
  photos[part].set(label, list);
  document.querySelector(`[data-count="${part}:${label}"]`).textContent = `${list.length}`;
  $("train").disabled = [...photos.train.values()].flat().length < 2;
}

async function cameraShot(label) {
  const stream = await navigator.mediaDevices.getUserMedia({video: true});
  const video = Object.assign(document.createElement("video"), {srcObject: stream, muted: true});
  await video.play();
  const canvas = new OffscreenCanvas(video.videoWidth, video.videoHeight);
  canvas.getContext("2d").drawImage(video, 0, 0);
  stream.getTracks().forEach((t) => t.stop());
  addPhotos("train", label, [{pixels: await imagePixels(canvas), name: `camera-${Date.now()}`}]);
}

function labelCard(label) {
  const card = document.createElement("div");
  card.className = "label";
  card.innerHTML = `<b>${label}</b>
    <div>training photos: <span data-count="train:${label}">0</span> <input type="file" accept="image/*" multiple data-part="train"></div>
    <div>held-out photos: <span data-count="test:${label}">0</span> <input type="file" accept="image/*" multiple data-part="test"></div>`;
  for (const input of card.querySelectorAll("input")) {
    input.dataset.label = label;
    input.addEventListener("change", async () => addPhotos(input.dataset.part, label, await pixelsOf(input.files)));
  }
  if (navigator.mediaDevices?.getUserMedia) {
    const shot = Object.assign(document.createElement("button"), {textContent: "camera"});
    shot.addEventListener("click", () => cameraShot(label).catch((e) => ($("status").textContent = e.message)));
    card.append(shot);
  }
  return card;
}

function drawLoss() {
  const canvas = $("loss"), context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (losses.length < 2) return;
  const max = Math.max(...losses), min = Math.min(...losses, 0);
  context.strokeStyle = "#1f6feb";
  context.lineWidth = 2;
  context.beginPath();
  losses.forEach((loss, i) => {
    const x = 8 + (i / (losses.length - 1)) * (canvas.width - 16);
    const y = canvas.height - 8 - ((loss - min) / (max - min || 1)) * (canvas.height - 16);
    i ? context.lineTo(x, y) : context.moveTo(x, y);
  });
  context.stroke();
}

async function heldOut() {
  const images = [...photos.test.values()].flat();
  if (!images.length) return null;
  return (await trainer.evaluate(images)).accuracy;
}

async function train() {
  $("train").disabled = true;
  $("cancel").disabled = false;
  const before = await heldOut();
  const images = [...photos.train.values()].flat();
  $("status").textContent = `training on ${images.length} photos…`;
  try {
    const summary = await trainer.train(images, {epochs: Number($("epochs").value), batchSize: 8, valSplit: 0},
      {onBatch: (step, total, loss) => {
        $("progress").max = total;
        $("progress").value = step;
        losses.push(loss);
        drawLoss();
      }});
    const after = await heldOut();
    $("status").textContent = `${summary.stopped}: ${summary.epochsCompleted} epochs, ${summary.steps} steps in ` +
      `${summary.seconds.toFixed(1)} s; the state is saved on this device`;
    if (after !== null) {
      $("accuracy").textContent = `held-out accuracy ${(100 * before).toFixed(1)}% → ${(100 * after).toFixed(1)}%`;
      document.body.dataset.accuracyBefore = before;
      document.body.dataset.accuracyAfter = after;
    }
    document.body.dataset.trained = summary.steps;
  } catch (error) {
    $("status").textContent = error.message;
  } finally {
    $("train").disabled = false;
    $("cancel").disabled = true;
  }
}

async function main() {
  const opened = await trainer.open({url: params.get("bundle") ?? "/bundle/", name: params.get("name") ?? "demo",
    ortUrl: new URL("/ort/ort.all.min.mjs", location.href).href,
    executionProviders: (params.get("ep") ?? "wasm").split(",")});
  labels = opened.labels;
  const progress = opened.progress;
  const resumed = progress && progress.step ? ` — continuing from the state saved on this device (${progress.step} steps, ` +
    `${progress.epoch} epochs)` : "";
  $("status").textContent = `${opened.backbone} (${opened.preset}), labels: ${labels.join(", ")}${resumed}`;
  document.body.dataset.savedSteps = progress?.step ?? 0;
  for (const label of labels) $("labels").append(labelCard(label));
  $("train").addEventListener("click", train);
  $("cancel").addEventListener("click", () => trainer.cancel());
  $("predict").addEventListener("change", async () => {
    const results = await trainer.predict(await pixelsOf($("predict").files));
    $("predictions").innerHTML = results.map((r) => `<li>${r.input}: ${r.top.map((t) =>
      `${t.label} ${(100 * t.score).toFixed(0)}%`).join(", ")}</li>`).join("");
  });
  document.body.dataset.ready = "1";
}

main().catch((error) => {
  $("status").textContent = error.message;
  document.body.dataset.error = error.message;
});
