// loradeploy.mjs: a loradeploy web bundle (export --target onnx-web) in onnxruntime-web's
// WebAssembly backend. One base graph whose LoRA slots, LayerNorm weights and head are plain graph
// inputs; an adapter is a safetensors file whose tensors are fed to those inputs, so loading or
// swapping an adapter never re-creates the session. The same file runs in a browser and in
// Node >= 20 (file: URLs are read with fs/promises there).
//
//   const s = await open(new URL('./', import.meta.url));
//   await s.loadAdapter('sora', 'adapters/sora.safetensors');
//   const { logits } = await s.run(['a text'], { adapter: 'sora' });
//   const router = new ABRouter(s, { A: 'sora', B: null }, { A: 1, B: 1 });
//   const { arm, result } = await router.run('user-42', ['a text']);
//   await router.replaceArm('B', 'adapters/increlora.safetensors');  // loaded, owned, unloaded when replaced
//   LM bundles (task causal-lm, lm.mjs): await s.generate('a prompt', { adapter: 'sora', maxNewTokens: 32 })

import { Decoder, lmMethods } from './lm.mjs';

export const FORMAT = 'loradeploy-web';
export const FORMAT_VERSION = 1;

async function readBytes(url) {
  if (url.protocol === 'file:') {
    const fs = await import('node:fs/promises');
    try {
      return new Uint8Array(await fs.readFile(url));
    } catch (e) {
      throw new Error(`${decodeURIComponent(url.pathname)}: cannot be read (${e.code || e.message})`);
    }
  }
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new Error(`${url}: cannot be fetched (${e.message})`);
  }
  if (!response.ok) throw new Error(`${url}: cannot be fetched (HTTP ${response.status})`);
  return new Uint8Array(await response.arrayBuffer());
}

async function readJson(url) {
  const bytes = await readBytes(url);
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch (e) {
    throw new Error(`${url}: not valid JSON (${e.message})`);
  }
}

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

const DTYPES = { F32: ['float32', 4, Float32Array] };

/** Parse a safetensors file: 8-byte little-endian header length, JSON header, raw data.
 *  Returns { metadata, tensors: {name: {dtype, shape, data}} }; a problem names `where`. */
export function parseSafetensors(bytes, where) {
  if (bytes.length < 8) throw new Error(`${where}: truncated (${bytes.length} bytes, no safetensors header)`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = Number(view.getBigUint64(0, true));
  if (8 + headerLength > bytes.length) {
    throw new Error(`${where}: truncated (header of ${headerLength} bytes, file of ${bytes.length})`);
  }
  let header;
  try {
    header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
  } catch (e) {
    throw new Error(`${where}: not a safetensors file (header is not JSON: ${e.message})`);
  }
  // loradeploy's fields are one JSON value (file_metadata in the Python plugin); other files: as they are
  const raw = header.__metadata__ || {};
  let metadata = raw;
  if (typeof raw.loradeploy === 'string') {
    try { metadata = JSON.parse(raw.loradeploy); } catch (e) { throw new Error(`${where}: its loradeploy metadata is not JSON (${e.message})`); }
  }
  const tensors = {};
  const start = 8 + headerLength;
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const kind = DTYPES[entry.dtype];
    if (!kind) throw new Error(`${where}: tensor ${name} is ${entry.dtype}, only F32 is read`);
    const [begin, end] = entry.data_offsets;
    const count = entry.shape.reduce((a, b) => a * b, 1);
    if (end - begin !== count * kind[1]) {
      throw new Error(`${where}: tensor ${name} has ${end - begin} bytes for shape [${entry.shape}]`);
    }
    if (start + end > bytes.length) {
      throw new Error(`${where}: truncated (tensor ${name} ends at byte ${start + end}, file of ${bytes.length})`);
    }
    const copy = bytes.slice(start + begin, start + end); // aligned, owned
    tensors[name] = { dtype: kind[0], shape: entry.shape, data: new kind[2](copy.buffer) };
  }
  return { metadata, tensors };
}

class Queue {
  // onnxruntime-web runs one call of a session at a time: calls wait their turn here
  constructor() { this.tail = Promise.resolve(); }
  run(fn) {
    const next = this.tail.then(fn, fn);
    this.tail = next.catch(() => {});
    return next;
  }
}

export class WebSession {
  constructor(ort, session, bundleUrl, config, tokenizer, baseTensors) {
    this.ort = ort;
    this.session = session;
    this.bundleUrl = bundleUrl;
    this.config = config;
    this.tokenizer = tokenizer;
    this.adapters = new Map();
    this.queue = new Queue();
    this.baseFeeds = {};
    for (const [name, slot] of Object.entries(config.slots)) {
      const dims = slot.role === 'lora_A' ? [slot.shape[0], 0] : [0, slot.shape[1]];
      this.baseFeeds[name] = new ort.Tensor('float32', new Float32Array(0), dims);
    }
    for (const [name, shape] of Object.entries(config.travelling)) {
      const t = baseTensors[name];
      if (!t) throw new Error(`${config.base_tensors}: no tensor ${name} (the base's value of a graph input)`);
      this.baseFeeds[name] = new ort.Tensor('float32', t.data, shape);
    }
    const specials = tokenizer.encode('').ids.length;
    this.room = config.max_length - specials;
    this.decoder = config.task === 'causal-lm' ? new Decoder(this) : null;
    if (this.decoder) Object.assign(this, lmMethods);
  }

  /** The feeds of `adapter` (null: the base alone): every slot and travelling input. Not held:
   *  a call that awaits while using them goes through withFeeds. */
  feedsFor(adapter) {
    return { ...this.baseFeeds, ...(this.#held(adapter)?.feeds ?? {}) };
  }

  #held(adapter) {
    const held = adapter === null ? null : this.adapters.get(adapter);
    if (adapter !== null && !held) throw new Error(`adapter ${adapter} is not loaded (loaded: ${this.loaded()})`);
    return held;
  }

  /** `fn(feeds)` with `adapter`'s feeds held for the whole call (taken before the first await):
   *  an unload meanwhile waits for it, so a call never runs on freed tensors or another adapter's. */
  async withFeeds(adapter, fn) {
    const held = this.#held(adapter);
    const feeds = { ...this.baseFeeds, ...(held ? held.feeds : {}) };
    if (held) held.users += 1;
    try {
      return await fn(feeds);
    } finally {
      if (held) {
        held.users -= 1;
        this.#freeIfDone(held);
      }
    }
  }

  /** Check an adapter file against this base and keep its tensors as `name`. */
  async loadAdapter(name, url) {
    if (this.adapters.has(name)) throw new Error(`adapter ${name} is already loaded; unload it first`);
    const where = new URL(url, this.bundleUrl).href;
    const bytes = await readBytes(new URL(url, this.bundleUrl));
    const { metadata, tensors } = parseSafetensors(bytes, where);
    if (metadata.format !== FORMAT || Number(metadata.format_version) !== FORMAT_VERSION) {
      throw new Error(`${where}: not a ${FORMAT} adapter of version ${FORMAT_VERSION} (metadata ${JSON.stringify(metadata)})`);
    }
    if (metadata.base_fingerprint !== this.config.base_fingerprint) {
      throw new Error(`${where}: an adapter for base ${metadata.base_fingerprint}, this bundle's base is ${this.config.base_fingerprint}`);
    }
    const feeds = {};
    const ranks = {};
    for (const [tname, t] of Object.entries(tensors)) {
      const slot = this.config.slots[tname];
      const fixed = this.config.travelling[tname];
      if (slot) {
        const fixedAxis = slot.role === 'lora_A' ? 0 : 1;
        if (t.shape.length !== 2 || t.shape[fixedAxis] !== slot.shape[fixedAxis]) {
          throw new Error(`${where}: tensor ${tname} has shape [${t.shape}], the graph takes [${slot.shape}]`);
        }
        const module = tname.slice(0, tname.lastIndexOf('.'));
        const r = t.shape[1 - fixedAxis];
        if (module in ranks && ranks[module] !== r) {
          throw new Error(`${where}: ${module} has rank ${ranks[module]} in lora_A and ${r} in lora_B`);
        }
        ranks[module] = r;
      } else if (fixed) {
        if (t.shape.length !== fixed.length || t.shape.some((d, i) => d !== fixed[i])) {
          throw new Error(`${where}: tensor ${tname} has shape [${t.shape}], the graph takes [${fixed}]`);
        }
      } else {
        throw new Error(`${where}: tensor ${tname} is not an input of this graph`);
      }
      feeds[tname] = new this.ort.Tensor('float32', t.data, t.shape);
    }
    for (const module of Object.keys(ranks)) {
      if (!(`${module}.lora_A` in feeds) || !(`${module}.lora_B` in feeds)) {
        throw new Error(`${where}: ${module} has only one of lora_A and lora_B`);
      }
    }
    const fingerprint = await sha256Hex(bytes);
    if (this.adapters.has(name)) throw new Error(`adapter ${name} was loaded meanwhile by another caller`);
    this.adapters.set(name, { feeds, url: where, metadata, fingerprint, users: 0, retired: false, freed: false });
    return { name, url: where, tensors: Object.keys(feeds).length, fingerprint };
  }

  /** Forget `name` at once: later calls naming it are refused. Calls already started keep its
   *  tensors and answer with it; the tensors are released when the last of them returns
   *  (loradeploy.runtime's Session.unload_adapter rule). */
  unloadAdapter(name) {
    const held = this.adapters.get(name);
    if (!held) throw new Error(`adapter ${name} is not loaded (loaded: ${this.loaded()})`);
    this.adapters.delete(name);
    held.retired = true;
    this.#freeIfDone(held);
  }

  #freeIfDone(held) {
    if (!held.retired || held.users || held.freed) return;
    held.freed = true;
    for (const t of Object.values(held.feeds)) t.dispose(); // a later run with them would fail, never answer
  }

  loaded() { return [...this.adapters.keys()].join(', ') || 'none'; }

  /** input_ids / attention_mask for `texts`: the bundle's tokenizer, truncated to max_length, padded right. */
  encode(texts) {
    const rows = texts.map((text) => {
      let tokens = this.tokenizer.encode_text(text) || [];
      if (tokens.length > this.room) tokens = tokens.slice(0, this.room);
      const processed = this.tokenizer.post_processor ? this.tokenizer.post_processor(tokens, null, true).tokens : tokens;
      return processed.map((t) => this.tokenizer.token_to_id(t) ?? this.tokenizer.model.unk_token_id);
    });
    const width = Math.max(1, ...rows.map((r) => r.length));
    const ids = rows.map((r) => [...r, ...new Array(width - r.length).fill(this.config.pad_token_id)]);
    const mask = rows.map((r) => [...new Array(r.length).fill(1), ...new Array(width - r.length).fill(0)]);
    return { input_ids: ids, attention_mask: mask };
  }

  /** Outputs for token ids (rows of equal length) with `adapter` (null: the base alone). */
  async runIds(inputIds, attentionMask, { adapter = null } = {}) {
    const batch = inputIds.length;
    const seq = batch ? inputIds[0].length : 0;
    const ids = BigInt64Array.from(inputIds.flat(), (x) => BigInt(x));
    const mask = BigInt64Array.from(attentionMask.flat(), (x) => BigInt(x));
    const out = await this.withFeeds(adapter, (feeds) => {
      feeds.input_ids = new this.ort.Tensor('int64', ids, [batch, seq]);
      feeds.attention_mask = new this.ort.Tensor('int64', mask, [batch, seq]);
      return this.queue.run(() => this.session.run(feeds));
    });
    const t = out[this.config.output];
    const width = t.dims[1];
    const rows = [];
    for (let i = 0; i < t.dims[0]; i++) rows.push(Array.from(t.data.subarray(i * width, (i + 1) * width)));
    return rows;
  }

  /** Logits (classifiers) or embeddings for `texts` with `adapter`; `ms` is the call's time. */
  async run(texts, { adapter = null } = {}) {
    if (this.decoder) throw new Error('an LM bundle: use generate(prompt, {adapter}) or logits(tokens, {adapter})');
    const t0 = performance.now();
    const enc = this.encode(texts);
    const outputs = await this.runIds(enc.input_ids, enc.attention_mask, { adapter });
    const key = this.config.task === 'sequence-classification' ? 'logits' : 'embeddings';
    return { [key]: outputs, outputs, adapter, ms: performance.now() - t0 };
  }

  info() {
    const c = this.config;
    return { task: c.task, labels: c.labels, output: c.output, inputs: this.session.inputNames.length,
             slots: Object.keys(c.slots).length, travelling: Object.keys(c.travelling).length,
             adapters: [...this.adapters.keys()], bundleAdapters: c.adapters, baseFingerprint: c.base_fingerprint,
             maxLength: c.max_length, ortVersion: this.ort.env.versions?.web ?? null, threads: this.ort.env.wasm.numThreads };
  }

  async release() { await this.session.release(); }
}

/** Open the bundle at `bundleUrl` (a folder URL). options.threads: wasm threads (default 1). */
export async function open(bundleUrl, options = {}) {
  const base = new URL(String(bundleUrl).endsWith('/') ? String(bundleUrl) : `${bundleUrl}/`);
  const config = await readJson(new URL('web.json', base));
  if (config.format !== FORMAT || config.format_version !== FORMAT_VERSION) {
    throw new Error(`${new URL('web.json', base)}: not a ${FORMAT} bundle of version ${FORMAT_VERSION}`);
  }
  const ortDir = new URL(config.ort.dir, base);
  for (const file of [config.ort.module, ...config.ort.runtime]) {
    await readBytes(new URL(file, ortDir)); // a missing wasm/mjs fails here, naming the file
  }
  const ort = await import(new URL(config.ort.module, ortDir).href);
  ort.env.wasm.numThreads = options.threads ?? 1;
  ort.env.wasm.wasmPaths = ortDir.protocol === 'file:' ? decodeURIComponent(ortDir.pathname) : ortDir.href;
  ort.env.logLevel = 'error';
  const { Tokenizer } = await import(new URL(config.tokenizer.module, base).href);
  const tokenizer = new Tokenizer(await readJson(new URL(config.tokenizer.json, base)),
                                  await readJson(new URL(config.tokenizer.config, base)));
  const baseTensors = parseSafetensors(await readBytes(new URL(config.base_tensors, base)),
                                       new URL(config.base_tensors, base).href).tensors;
  const modelUrl = new URL(config.model, base);
  let session;
  try {
    session = await ort.InferenceSession.create(await readBytes(modelUrl), { executionProviders: ['wasm'] });
  } catch (e) {
    throw new Error(`${modelUrl.href}: onnxruntime-web cannot load it (${e.message})`);
  }
  return new WebSession(ort, session, base, config, tokenizer, baseTensors);
}

// --- A/B routing: the same assignment as loradeploy.runtime.router.assign -----------------------

/** Index of the arm `key` falls in, for cumulative weight fractions `cuts` (last 1.0):
 *  u = first 8 bytes of sha256(experiment NUL key), big-endian, / 2**64. */
export async function assign(key, cuts, experiment = 'ab') {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(`${experiment}\0${key}`)));
  const u = Number(new DataView(digest.buffer).getBigUint64(0, false)) / 2 ** 64;
  let i = 0;
  while (i < cuts.length && cuts[i] <= u) i++;
  return Math.min(i, cuts.length - 1);
}

export function cutsOf(names, weights) {
  const w = names.map((n) => (weights == null ? 1 : Number(weights[n] ?? 0)));
  if (w.some((x) => !(x >= 0)) || w.reduce((a, b) => a + b, 0) <= 0) {
    throw new Error(`weights ${JSON.stringify(weights)}: give one non-negative weight per arm (${names.join(', ')}), not all zero`);
  }
  const total = w.reduce((a, b) => a + b, 0);
  let acc = 0;
  const cuts = w.map((x) => (acc += x) / total);
  cuts[cuts.length - 1] = 1.0;
  return cuts;
}

/** One arm's adapter at one generation; replaced as a whole, never edited (but its in-flight count). */
function armState(arm, adapter, fingerprint, generation, owned) {
  return { arm, adapter, fingerprint, generation, owned, inflight: 0, retired: false };
}

export class ABRouter {
  /** arms: {armName: adapterName | null (the base alone)}, names loaded in `session`;
   *  weights: {armName: weight} (default equal). A file is given to an arm with replaceArm. */
  constructor(session, arms, weights = null, experiment = 'ab') {
    this.session = session;
    this.names = Object.keys(arms);
    if (!this.names.length) throw new Error('an A/B test needs at least one arm');
    this.cuts = cutsOf(this.names, weights);
    this.experiment = experiment;
    this.current = {};
    this.generations = {};
    for (const name of this.names) {
      const adapter = arms[name] ?? null;
      const held = adapter === null ? null : session.adapters.get(adapter);
      if (adapter !== null && !held) {
        throw new Error(`arm ${name}: adapter ${adapter} is not loaded (loaded: ${session.loaded()})`);
      }
      this.current[name] = armState(name, adapter, held ? held.fingerprint : null, 0, false);
      this.generations[name] = 0;
    }
    this.counts = Object.fromEntries(this.names.map((n) => [n, 0]));
    this.errors = Object.fromEntries(this.names.map((n) => [n, 0]));
  }

  async armFor(key) { return this.names[await assign(String(key), this.cuts, this.experiment)]; }

  /** The session adapter name `arm` serves now (null: the base alone). */
  adapter(arm) { return this.#arm(arm).adapter; }

  #arm(arm) {
    if (!(arm in this.current)) throw new Error(`no arm ${arm} (arms: ${this.names.join(', ')})`);
    return this.current[arm];
  }

  /** Point `arm` at `adapter`: a name loaded in the session, a URL of an adapter file (a URL
   *  object or a string with a '/', relative to the bundle; loaded as `ab.<arm>.<generation>`,
   *  owned by the router) or null. Calls already routed keep the adapter they started with;
   *  later calls get the new one. A replaced owned adapter is unloaded when its last call is
   *  done. A refused file rejects the promise and the arm keeps its adapter. The swap itself is
   *  synchronous when nothing has to be loaded. Resolves to {adapter, fingerprint, generation}. */
  replaceArm(arm, adapter) {
    try {
      this.#arm(arm);
      const generation = ++this.generations[arm]; // reserved now: concurrent replaces load under distinct names
      const next = this.#prepare(arm, adapter ?? null, generation);
      return next instanceof Promise ? next.then((state) => this.#install(state)) : Promise.resolve(this.#install(next));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  #prepare(arm, adapter, generation) {
    if (adapter === null) return armState(arm, null, null, generation, false);
    if (typeof adapter === 'string' && this.session.adapters.has(adapter)) {
      return armState(arm, adapter, this.session.adapters.get(adapter).fingerprint, generation, false);
    }
    if (!(adapter instanceof URL) && !(typeof adapter === 'string' && adapter.includes('/'))) {
      throw new Error(`arm ${arm}: ${adapter} is no adapter loaded in this session (loaded: ${this.session.loaded()}) `
                      + 'and no adapter file URL');
    }
    const name = `ab.${arm}.${generation}`;
    return this.session.loadAdapter(name, adapter).then((info) => armState(arm, name, info.fingerprint, generation, true));
  }

  #install(state) {
    const old = this.current[state.arm];
    this.current[state.arm] = state;
    old.retired = true;
    this.#dropIfDone(old);
    return { adapter: state.adapter, fingerprint: state.fingerprint, generation: state.generation };
  }

  #dropIfDone(state) {
    if (!(state.retired && state.owned && state.inflight === 0)) return;
    state.owned = false; // unload once
    if (this.session.adapters.has(state.adapter)) this.session.unloadAdapter(state.adapter);
  }

  /** One call for `key` with its arm's current adapter: {arm, adapter, generation, result, ms}. */
  async run(key, texts) {
    const arm = await this.armFor(key);
    const state = this.current[arm];
    state.inflight += 1;
    const t0 = performance.now();
    try {
      const result = await this.session.run(texts, { adapter: state.adapter });
      this.counts[arm] += 1;
      return { arm, adapter: state.adapter, generation: state.generation, result, ms: performance.now() - t0 };
    } catch (e) {
      this.errors[arm] += 1;
      throw e;
    } finally {
      state.inflight -= 1;
      this.#dropIfDone(state);
    }
  }

  /** Per arm: its adapter, fingerprint, generation, calls answered, failed and in flight. */
  snapshot() {
    const arms = {};
    for (const n of this.names) {
      const { adapter, fingerprint, generation, inflight } = this.current[n];
      arms[n] = { adapter, fingerprint, generation, requests: this.counts[n], errors: this.errors[n], inflight };
    }
    return { experiment: this.experiment, arms };
  }
}
