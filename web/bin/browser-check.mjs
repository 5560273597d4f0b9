// The browser check of an onnx-web bundle: serve the bundle folder on 127.0.0.1, open its
// index.html in headless Chromium (puppeteer-core driving the system's browser), run the given
// texts through the page's session with each adapter (null: none), write the outputs as JSON.
//   node browser-check.mjs BUNDLE_DIR REQUEST.json RESULT.json CHROMIUM [SCREENSHOT.png]
// REQUEST: {texts: [...], adapters: [name | null, ...], lm: {width, tokens} (LM bundles), ab_scenario?:
// options}; RESULT: {browser, outputs: {name|"": rows (LM bundles: per text {logits, tokens})}, ab?}.
// With ab_scenario, the page also runs web/test/ab-scenario.mjs (served at /__loradeploy_test__/) on
// its session: RESULT.ab is what it returns.
import { createServer } from 'node:http';
import { readFile, writeFile } from 'node:fs/promises';
import { extname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';

const [bundle, requestPath, resultPath, chromium, screenshot] = process.argv.slice(2);
const TYPES = { '.html': 'text/html', '.mjs': 'text/javascript', '.js': 'text/javascript', '.json': 'application/json',
                '.wasm': 'application/wasm' };

const TEST_DIR = fileURLToPath(new URL('../test/', import.meta.url));
const TEST_PREFIX = '/__loradeploy_test__/';

const server = createServer(async (req, res) => {
  const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
  const file = path.startsWith(TEST_PREFIX) ? join(TEST_DIR, path.slice(TEST_PREFIX.length))
    : join(bundle, path.endsWith('/') ? `${path}index.html` : path);
  try {
    const body = await readFile(file);
    res.writeHead(200, { 'content-type': TYPES[extname(path)] || 'application/octet-stream' });
    res.end(body);
  } catch {
    res.writeHead(404);
    res.end();
  }
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const url = `http://127.0.0.1:${server.address().port}/index.html`;
const request = JSON.parse(await readFile(requestPath, 'utf8'));
const browser = await puppeteer.launch({ executablePath: chromium, headless: true, args: ['--no-sandbox'] });
try {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(url, { waitUntil: 'load' });
  const outputs = await page.evaluate(async ({ texts, adapters, lm }) => {
    const session = await window.loradeploy;
    const out = {};
    for (const adapter of adapters) {
      if (!session.decoder) {
        out[adapter ?? ''] = (await session.run(texts, { adapter })).outputs;
        continue;
      }
      // LM bundles: per text, the last position's first lm.width logits and lm.tokens greedy tokens
      out[adapter ?? ''] = [];
      for (const text of texts) {
        const ids = session.tokenize(text);
        const { data, dims } = await session.logits(ids, { adapter });
        const last = Array.from(data.subarray((dims[0] - 1) * dims[1], (dims[0] - 1) * dims[1] + lm.width));
        const { tokens } = await session.decoder.greedy(ids, lm.tokens, session.feedsFor(adapter), false);
        out[adapter ?? ''].push({ logits: last, tokens });
      }
    }
    return out;
  }, request);
  const ab = request.ab_scenario ? await page.evaluate(async (options, scenario) => {
    const lib = await import('./loradeploy.mjs'); // the page's own module instance
    const { abScenario } = await import(scenario);
    return abScenario(lib, await window.loradeploy, options);
  }, request.ab_scenario, `${TEST_PREFIX}ab-scenario.mjs`) : undefined;
  if (screenshot) {
    await page.click('#go');
    await page.waitForFunction(() => document.getElementById('answer').textContent !== '');
    await page.screenshot({ path: screenshot });
  }
  const status = await page.$eval('#status', (e) => e.textContent);
  await writeFile(resultPath, JSON.stringify({ browser: await browser.version(), url, outputs, status, errors, ab }));
} catch (e) {
  // one line: the page's rejected promise names the file and the problem
  process.stderr.write(`${String(e && e.message ? e.message : e).split('\n')[0]}\n`);
  process.exitCode = 1;
} finally {
  await browser.close();
  server.close();
}
