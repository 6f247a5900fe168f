#!/usr/bin/env node
// `npm run demo -- BUNDLE [--port N]`: the browser demo on http://127.0.0.1:PORT/, serving the page, the built
// runtime, onnxruntime-web and the bundle (the files its manifest lists, read-only). COOP/COEP make the page
// cross-origin isolated, which onnxruntime-web's threads need. Loopback only: nothing leaves the machine.
import {createServer} from "node:http";
import {promises as fs} from "node:fs";
import path from "node:path";
import {fileURLToPath} from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..");
const args = process.argv.slice(2);
const portAt = args.indexOf("--port");
const port = portAt >= 0 ? Number(args[portAt + 1]) : 8741;
const valueOf = (flag) => (args.indexOf(flag) >= 0 ? args[args.indexOf(flag) + 1] : undefined);
const bundleDir = args.find((a, i) => !a.startsWith("--") && !["--port", "--data", "--bundles"].includes(args[i - 1]));
// --data DIR: files for the tests and benchmarks under /data/ (test data, more bundles); never in the demo
const dataDir = valueOf("--data") && path.resolve(valueOf("--data"));
const TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
  ".json": "application/json", ".css": "text/css", ".png": "image/png", ".jpg": "image/jpeg", ".map": "application/json"};

const mounts = [
  ["/dist/", path.join(root, "dist")],
  ["/ort/", path.join(root, "node_modules", "onnxruntime-web", "dist")],
  ["/tfjs/", path.join(root, "node_modules", "@tensorflow")],
  ["/demo/", here],
  ["/test/", path.join(root, "test")],
];

async function bundleFile(name) {
  if (!bundleDir) return null;
  const manifest = JSON.parse(await fs.readFile(path.join(bundleDir, "manifest.json"), "utf8"));
  const listed = name === "manifest.json" || name === "manifest.sig" || name in manifest.files;
  return listed && !name.includes("/") ? path.join(bundleDir, name) : null;
}

async function resolve(url) {
  const pathname = decodeURIComponent(new URL(url, "http://x").pathname);
  if (pathname.startsWith("/data/") && dataDir) {
    const file = path.resolve(dataDir, "." + pathname.slice("/data".length));
    return file.startsWith(dataDir + path.sep) ? file : null;
  }
  if (pathname === "/") return path.join(here, "index.html");
  if (pathname.startsWith("/bundle/")) return bundleFile(pathname.slice("/bundle/".length));
  for (const [prefix, folder] of mounts) {
    if (!pathname.startsWith(prefix)) continue;
    const file = path.resolve(folder, "." + pathname.slice(prefix.length - 1));
    return file.startsWith(folder + path.sep) ? file : null;
  }
  return null;
}

const server = createServer(async (request, response) => {
  const headers = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-store"};
  try {
    const file = await resolve(request.url);
    const body = file && await fs.readFile(file);
    response.writeHead(200, {...headers, "Content-Type": TYPES[path.extname(file)] ?? "application/octet-stream"});
    response.end(body);
  } catch {
    response.writeHead(404, headers);
    response.end("not found");
  }
});
server.listen(port, "127.0.0.1", () => {
  console.log(`edgeadapt demo on http://127.0.0.1:${server.address().port}/ (bundle: ${bundleDir ?? "none"})`);
});
