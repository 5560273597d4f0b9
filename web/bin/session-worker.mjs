// The Node side of loradeploy's onnx-web session: one bundle opened through the bundle's own
// loradeploy.mjs (the file a page imports), driven by JSON lines on stdin, one JSON line back
// per request ({ok: result} or {error: message}). Console output goes to stderr.
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';
import { readFile, writeFile } from 'node:fs/promises';

console.log = console.info = console.warn = console.debug = (...a) => process.stderr.write(`${a.join(' ')}\n`);

let lib = null;
let session = null;

function need() {
  if (!session) throw new Error('no bundle is open (send {"op": "open"} first)');
  return session;
}

const ops = {
  async open({ bundle, threads }) {
    const url = pathToFileURL(bundle.endsWith('/') ? bundle : `${bundle}/`);
    lib = await import(new URL('loradeploy.mjs', url).href);
    session = await lib.open(url, { threads: threads || 1 });
    return session.info();
  },
  async load({ name, path }) { return need().loadAdapter(name, pathToFileURL(path)); },
  async unload({ name }) { need().unloadAdapter(name); return null; },
  async encode({ texts }) { return need().encode(texts); },
  async run_ids({ input_ids, attention_mask, adapter }) {
    return need().runIds(input_ids, attention_mask, { adapter: adapter ?? null });
  },
  async run_texts({ texts, adapter }) { return (await need().run(texts, { adapter: adapter ?? null })).outputs; },
  async info() { return need().info(); },
  // LM bundles: the tokenizer, per-position logits (float32 little-endian into the file `out`: a
  // vocabulary of logits per position is too much for a JSON line), greedy tokens, generation
  async tokenize({ text }) { return need().tokenize(text); },
  async logits({ tokens, adapter, out }) {
    const { data, dims } = await need().logits(tokens, { adapter: adapter ?? null });
    await writeFile(out, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    return dims;
  },
  async greedy({ tokens, adapter, n }) {
    const s = need();
    return (await s.decoder.greedy(tokens, n, s.feedsFor(adapter ?? null), false)).tokens;
  },
  async time_greedy({ tokens, adapter, n }) {  // benchmarks: prompt and generation times inside Node
    const s = need();
    return s.decoder.greedy(tokens, n, s.feedsFor(adapter ?? null), false);
  },
  async generate({ prompt, adapter, max_new_tokens }) {
    return need().generate(prompt, { adapter: adapter ?? null, maxNewTokens: max_new_tokens });
  },
  async assign({ keys, cuts, experiment }) {
    const out = [];
    for (const key of keys) out.push(await lib.assign(key, cuts, experiment));
    return out;
  },
  // timings taken inside Node (benchmarks/onnx_web.py): calls, an adapter's load, a new session
  async time_runs({ input_ids, attention_mask, adapter, runs }) {
    const out = [];
    for (let i = 0; i < runs; i++) {
      const t0 = performance.now();
      await need().runIds(input_ids, attention_mask, { adapter: adapter ?? null });
      out.push(performance.now() - t0);
    }
    return out;
  },
  async time_load({ name, path }) {
    const t0 = performance.now();
    await need().loadAdapter(name, pathToFileURL(path));
    const loaded = performance.now() - t0;
    need().unloadAdapter(name);
    return loaded;
  },
  async time_open({ bundle }) {
    const t0 = performance.now();
    const other = await lib.open(pathToFileURL(bundle.endsWith('/') ? bundle : `${bundle}/`), { threads: 1 });
    const opened = performance.now() - t0;
    await other.release();
    return opened;
  },
  async time_model({ model, input_ids, attention_mask, runs }) {
    // another graph (benchmarks: the merged model) in the same onnxruntime-web, ids and mask only
    const ort = need().ort;
    const other = await ort.InferenceSession.create(new Uint8Array(await readFile(model)), { executionProviders: ['wasm'] });
    const dims = [input_ids.length, input_ids[0].length];
    const feeds = { input_ids: new ort.Tensor('int64', BigInt64Array.from(input_ids.flat(), BigInt), dims),
                    attention_mask: new ort.Tensor('int64', BigInt64Array.from(attention_mask.flat(), BigInt), dims) };
    const out = [];
    let result = null;
    for (let i = 0; i < runs + 1; i++) {
      const t0 = performance.now();
      result = await other.run(feeds);
      out.push(performance.now() - t0);
    }
    await other.release();
    return { ms: out.slice(1), output: Array.from(result[other.outputNames[0]].data) };
  },
  async peak_rss_mb() { return process.resourceUsage().maxRSS / 1024; },
  // the A/B router: each key's arm, and concurrent routed runs (one text per key)
  async route({ arms, weights, keys, experiment }) {
    const router = new lib.ABRouter(need(), arms, weights ?? null, experiment ?? 'ab');
    return Promise.all(keys.map((key) => router.armFor(key)));
  },
  async route_run({ arms, weights, keys, texts, experiment }) {
    const router = new lib.ABRouter(need(), arms, weights ?? null, experiment ?? 'ab');
    return Promise.all(keys.map(async (key, i) => {
      const { arm, adapter, result } = await router.run(key, [texts[i % texts.length]]);
      return { key, arm, adapter, text: i % texts.length, outputs: result.outputs[0] };
    }));
  },
  // concurrent routed callers while arms are replaced and an adapter is loaded and unloaded
  async ab_scenario({ texts, files, callers, per_phase }) {
    const { abScenario } = await import(new URL('../test/ab-scenario.mjs', import.meta.url).href);
    return abScenario(lib, need(), { texts, files, callers, perPhase: per_phase });
  },
  // a fixed unit of work in onnxruntime-web (the latency reference): the graph at `model`, fed `x`
  async reference_open({ ort_module, model, threads }) {
    const ort = await import(pathToFileURL(ort_module).href);
    ort.env.wasm.numThreads = threads || 1;
    ort.env.wasm.wasmPaths = pathToFileURL(ort_module).href.replace(/[^/]*$/, '');
    const ref = await ort.InferenceSession.create(new Uint8Array(await readFile(model)), { executionProviders: ['wasm'] });
    const [, seq, hidden] = [1, 128, 384];
    const data = Float32Array.from({ length: seq * hidden }, (_, i) => Math.sin(i));
    ops.reference_unit = async () => {
      const t0 = performance.now();
      await ref.run({ x: new ort.Tensor('float32', data, [1, seq, hidden]) });
      return performance.now() - t0;
    };
    return null;
  },
};

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let reply;
  try {
    const request = JSON.parse(line);
    if (!(request.op in ops)) throw new Error(`unknown op ${request.op}`);
    reply = { ok: (await ops[request.op](request)) ?? null };
  } catch (e) {
    reply = { error: String(e && e.message ? e.message : e) };
  }
  process.stdout.write(`${JSON.stringify(reply)}\n`);
}
if (session) await session.release();
