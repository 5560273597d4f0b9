// lm.mjs: the KV-cache decoder of a loradeploy LM bundle (export --target onnx-web-int4), used by
// loradeploy.mjs's session: per-position logits (validation) and greedy generation. The graph takes
// input_ids, attention_mask (ones over cache + new tokens) and one past key/value tensor per layer
// [1, kv_heads, past, head_size]; it returns logits [1, n, vocab] and the cache with the new tokens.

export class Decoder {
  /** web: the WebSession (its ort, session, queue, feeds and tokenizer); config.decoder from web.json. */
  constructor(web) {
    this.web = web;
    this.spec = web.config.decoder;
    this.eos = new Set(this.spec.eos_token_ids);
  }

  emptyCache() {
    const { ort } = this.web;
    const dims = [1, this.spec.kv_heads, 0, this.spec.head_size];
    return this.spec.past.map(() => new ort.Tensor('float32', new Float32Array(0), dims));
  }

  /** Logits of `tokens` after `past` (null: an empty cache), with `feeds` (slots, norms):
   *  { logits: Float32Array [n * vocab], cache }. */
  async forward(tokens, past, feeds) {
    const { ort } = this.web;
    const cache = past ?? this.emptyCache();
    const total = cache[0].dims[2] + tokens.length;
    const run = { ...feeds };
    run.input_ids = new ort.Tensor('int64', BigInt64Array.from(tokens, (t) => BigInt(t)), [1, tokens.length]);
    run.attention_mask = new ort.Tensor('int64', new BigInt64Array(total).fill(1n), [1, total]);
    this.spec.past.forEach((name, i) => { run[name] = cache[i]; });
    const out = await this.web.queue.run(() => this.web.session.run(run));
    return { logits: out[this.spec.logits].data, cache: this.spec.present.map((name) => out[name]) };
  }

  /** Token ids of a prompt as the bundle's tokenizer gives them (its specials, e.g. <bos>, added). */
  tokenize(text) {
    const tok = this.web.tokenizer;
    const tokens = tok.encode_text(text) || [];
    const processed = tok.post_processor ? tok.post_processor(tokens, null, true).tokens : tokens;
    return processed.map((t) => tok.token_to_id(t) ?? tok.model.unk_token_id);
  }

  argmaxLast(logits) {
    const vocab = this.spec.vocab_size;
    const start = logits.length - vocab;
    let best = 0;
    for (let v = 1; v < vocab; v++) if (logits[start + v] > logits[start + best]) best = v;
    return best;
  }

  /** Greedy tokens after `tokens`: at most n, stopping at end-of-sequence when stopAtEos. */
  async greedy(tokens, n, feeds, stopAtEos = true) {
    const t0 = performance.now();
    let { logits, cache } = await this.forward(tokens, null, feeds);
    const prompted = performance.now();
    const out = [];
    while (out.length < n) {
      out.push(this.argmaxLast(logits));
      if ((stopAtEos && this.eos.has(out[out.length - 1])) || out.length === n) break;
      ({ logits, cache } = await this.forward(out.slice(-1), cache, feeds));
    }
    const done = performance.now();
    return { tokens: out, promptMs: prompted - t0, generateMs: done - prompted };
  }
}

/** Methods a WebSession of an LM bundle adds (loradeploy.mjs binds them). */
export const lmMethods = {
  /** Per-position logits [tokens.length rows of vocab] for token ids, with `adapter` (null: none). */
  async logits(tokens, { adapter = null } = {}) {
    const { logits } = await this.withFeeds(adapter, (feeds) => this.decoder.forward(tokens, null, feeds));
    return { data: logits, dims: [tokens.length, this.decoder.spec.vocab_size] };
  },

  tokenize(text) { return this.decoder.tokenize(text); },

  /** Greedy generation after `prompt` with `adapter` (null: the base alone), KV cache reused:
   *  { text, tokens, promptTokens, ms, promptMs, tokensPerSecond } (tokens/s after the prompt). */
  async generate(prompt, { adapter = null, maxNewTokens = 32 } = {}) {
    const t0 = performance.now();
    const ids = this.decoder.tokenize(prompt);
    const { tokens, promptMs, generateMs } = await this.withFeeds(adapter,
      (feeds) => this.decoder.greedy(ids, maxNewTokens, feeds));
    const text = this.tokenizer.decode(tokens, { skip_special_tokens: true });
    return { text, tokens, adapter, promptTokens: ids.length, ms: performance.now() - t0, promptMs,
             tokensPerSecond: tokens.length > 1 ? (tokens.length - 1) / (generateMs / 1e3) : null };
  },
};
