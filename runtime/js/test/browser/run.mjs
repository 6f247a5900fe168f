// Drives Debian's Chromium (headless, puppeteer-core) for the Python suite (tests/test_js_runtime.py):
//   node test/browser/run.mjs demo BUNDLE TRAIN_DIR TEST_DIR SCREENSHOT   → JSON: status, accuracies, after reload
//   node test/browser/run.mjs steps DATA_DIR SPEC_JSON                    → JSON: per-run losses and parameters
//   node test/browser/run.mjs prepare DATA_DIR OPTIONS_JSON               → JSON: photos decoded and prepared by Chromium
//   node test/browser/run.mjs cache DATA_DIR OPTIONS_JSON                 → JSON: three runs with the IndexedDB feature cache
//   node test/browser/run.mjs tfjs SPEC_JSON                              → JSON: TensorFlow.js's per-run step times
//   (TensorFlow.js: each run in a fresh page; in both, `{"idle": true}` only loads the page: the benchmark's memory
//   baseline)
import puppeteer from "puppeteer-core";
import {spawn} from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import {fileURLToPath} from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const [mode, ...args] = process.argv.slice(2);
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

async function serve(extra) {
  const server = spawn("node", [path.join(here, "..", "..", "demo", "serve.mjs"), "--port", "0", ...extra],
    {stdio: ["ignore", "pipe", "inherit"]});
  const line = await new Promise((resolve) => server.stdout.once("data", (d) => resolve(String(d))));
  return {server, origin: /http:\/\/127\.0\.0\.1:\d+/.exec(line)[0]};
}

async function launch() {
  const profile = fs.mkdtempSync(path.join((await import("node:os")).tmpdir(), "edgeadapt-chromium-"));
  return puppeteer.launch({executablePath: CHROMIUM, headless: true, userDataDir: profile, protocolTimeout: 900_000,
    args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run",
      "--disable-sync", "--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-angle=swiftshader"]});
}

async function demo([bundle, train, test, screenshot]) {
  const {server, origin} = await serve([bundle]);
  const browser = await launch();
  try {
    const page = await browser.newPage();
    await page.setViewport({width: 900, height: 980});
    const ready = () => page.waitForFunction(() => document.body.dataset.ready || document.body.dataset.error, {timeout: 300_000});
    await page.goto(`${origin}/?name=demo-test`);
    await ready();
    for (const [part, root] of [["train", train], ["test", test]]) {
      for (const label of fs.readdirSync(root).sort()) {
        const files = fs.readdirSync(path.join(root, label)).sort().map((f) => path.join(root, label, f));
        await (await page.$(`input[data-part="${part}"][data-label="${label}"]`)).uploadFile(...files);
      }
    }
    await page.waitForFunction(() => !document.getElementById("train").disabled);
    const responsive = page.evaluate(() => new Promise((resolve) => {
      let ticks = 0;  // timer ticks on the page while the worker trains: the page stays responsive
      const timer = setInterval(() => { ticks++; if (document.body.dataset.trained) { clearInterval(timer); resolve(ticks); } }, 50);
    }));
    await page.click("#train");
    await page.waitForFunction(() => document.body.dataset.trained || document.body.dataset.error, {timeout: 900_000});
    const body = await page.evaluate(() => ({...document.body.dataset, status: document.getElementById("status").textContent,
      progress: [document.getElementById("progress").value, document.getElementById("progress").max]}));
    body.ticks = await responsive;
    await page.screenshot({path: screenshot});
    await page.reload();
    await ready();
    body.afterReload = await page.evaluate(() => ({...document.body.dataset, status: document.getElementById("status").textContent}));
    return body;
  } finally {
    await browser.close();
    server.kill();
  }
}

/** `use(page)` on the parity page (test/browser/parity.html) of a fresh browser, DATA_DIR served under /data/. */
async function onParityPage(dataDir, use) {
  const {server, origin} = await serve(["--data", dataDir]);
  const browser = await launch();
  try {
    const page = await browser.newPage();
    await page.goto(`${origin}/test/browser/parity.html`);
    await page.waitForFunction(() => document.body.dataset.ready);
    return await use(page);
  } finally {
    await browser.close();
    server.kill();
  }
}

function steps([dataDir, specText]) {
  return onParityPage(dataDir, async (page) => {
    const results = [];
    for (const run of JSON.parse(specText)) {
      if (run.idle) {
        results.push(await idle());
        continue;
      }
      try {
        results.push(await page.evaluate((o) => window.parity(o), {...run, bundleUrl: `/data/${run.bundle}/`,
          dataUrl: `/data/${run.data}`, name: `${run.bundle}-${run.ep.join("-")}-${run.threads ?? 1}`}));
      } catch (error) {
        results.push({error: String(error.message).split("\n")[0]});
      }
    }
    return results;
  });
}

const idle = () => new Promise((resolve) => setTimeout(() => resolve({times: []}), 1500));  // a page, loaded

async function tfjs([specText]) {
  const {server, origin} = await serve([]);
  const browser = await launch();
  try {
    const results = [];
    for (const run of JSON.parse(specText)) {
      const page = await browser.newPage();
      await page.goto(`${origin}/test/browser/tfjs.html`);
      await page.waitForFunction(() => document.body.dataset.ready);
      try {
        results.push(run.idle ? await idle() : await page.evaluate((o) => window.tfjsSteps(o), run));
      } catch (error) {
        results.push({error: String(error.message).split("\n")[0]});
      }
      await page.close();
    }
    return results;
  } finally {
    await browser.close();
    server.kill();
  }
}

const prepare = ([dataDir, options]) =>
  onParityPage(dataDir, (page) => page.evaluate((o) => window.preparePhotos(o), JSON.parse(options)));
const cache = ([dataDir, options]) =>
  onParityPage(dataDir, (page) => page.evaluate((o) => window.featureCacheRuns(o), JSON.parse(options)));

const modes = {demo, steps, tfjs, cache, prepare};
const result = await modes[mode](args);
console.log(JSON.stringify(result));
