// A/B while adapters change (issue 37 item 3), the same code in Node (session-worker.mjs, op
// ab_scenario) and in the page (browser-check.mjs): concurrent async callers go through an
// ABRouter while, in the same event loop, its arms are replaced and an adapter is loaded and
// unloaded. It returns what happened; the Python tests judge every answer against the expected
// output of the adapter recorded for its call.
//
// The session must have `sora` and `increlora` loaded under those names; `files` gives their
// files (URLs relative to the bundle). Arms and generations:
//   A: sora (0) → increlora (1) → none (2) → sora from its file, owned (3) → sora (4)
//   B: increlora (0) → extra, loaded for it (1) → none (2) → increlora from its file, owned (3) → increlora (4)
// `extra` (increlora's file under another name) is unloaded while direct calls with it are in flight.
//
// onnxruntime-web's wasm backend finishes a run in microtasks, so a swap made from a timer never
// meets a call between its routing and its answer. Each swap is therefore made while the session's
// call queue is held (as one long run would hold it): calls routed meanwhile have taken their
// adapter and wait; the swap happens with at least one call of that arm in flight.

// one turn of the event loop: a message, not a timer (a headless page's timers may be throttled)
function ticker() {
  const channel = new MessageChannel();
  const waiting = []; // one message per waiter, in order
  channel.port1.onmessage = () => waiting.shift()();
  const tick = () => new Promise((resolve) => { waiting.push(resolve); channel.port2.postMessage(null); });
  return { tick, close: () => channel.port1.close() };
}

export async function abScenario(lib, session, { texts, files, callers = 6, perPhase = 4, limit = 3000 }) {
  const router = new lib.ABRouter(session, { A: 'sora', B: 'increlora' });
  const phases = [{ arm: 'A', generation: 0, adapter: 'sora', source: 'sora' },
                  { arm: 'B', generation: 0, adapter: 'increlora', source: 'increlora' }];
  const { tick, close } = ticker();
  const calls = [];
  const failures = [];
  const answered = new Map(); // "arm/generation" → calls answered
  let stop = false;
  let next = 0;

  async function caller() {
    while (!stop && next < limit) {
      const j = next++;
      const text = j % texts.length;
      try {
        const r = await router.run(`user-${j}`, [texts[text]]);
        const id = `${r.arm}/${r.generation}`;
        answered.set(id, (answered.get(id) ?? 0) + 1);
        calls.push({ key: `user-${j}`, arm: r.arm, generation: r.generation, adapter: r.adapter, text,
                     crossed: router.snapshot().arms[r.arm].generation !== r.generation, outputs: r.result.outputs[0] });
      } catch (e) {
        failures.push(`user-${j}: ${e.message}`);
      }
      await tick(); // a caller's next request comes in a later task (in Chromium a routed call may never yield)
    }
  }

  async function served(arm, generation) {
    while ((answered.get(`${arm}/${generation}`) ?? 0) < perPhase) {
      if (next >= limit) throw new Error(`arm ${arm} generation ${generation}: fewer than ${perPhase} calls in ${limit}`);
      await tick();
    }
  }

  const inflightAtSwap = [];
  async function whileHeld(arm, act) {
    for (;;) {
      let release;
      const gate = new Promise((resolve) => { release = resolve; });
      const held = session.queue.run(() => gate);
      try {
        let arms = router.snapshot().arms;
        while (arms[arm].inflight === 0 && Object.values(arms).reduce((n, a) => n + a.inflight, 0) < callers) {
          if (stop || next >= limit) throw new Error(`arm ${arm}: no call in flight to swap under`);
          await tick();
          arms = router.snapshot().arms;
        }
        if (arms[arm].inflight > 0) {
          inflightAtSwap.push(arms[arm].inflight);
          return await act();
        }
      } finally {
        release();
        await held;
      }
    }
  }

  async function replace(arm, adapter, source) {
    const r = await whileHeld(arm, () => router.replaceArm(arm, adapter));
    phases.push({ arm, generation: r.generation, adapter: r.adapter, source });
    return r;
  }

  const observed = {};
  async function swapper() {
    try {
      await served('A', 0);
      await served('B', 0);
      await replace('A', 'increlora', 'increlora');
      await served('A', 1);
      await replace('A', null, null);
      await served('A', 2);
      const owned = await replace('A', files.sora, 'sora');
      await served('A', 3);
      await session.loadAdapter('extra', files.increlora);
      await replace('B', 'extra', 'increlora');
      await served('B', 1);
      await replace('B', null, null);
      // direct calls with `extra`, then its unload in the same synchronous step: they answer with it
      const direct = [0, 1, 2].map((text) => session.run([texts[text]], { adapter: 'extra' })
        .then((r) => ({ text, adapter: r.adapter, outputs: r.outputs[0] }), (e) => ({ text, error: e.message })));
      session.unloadAdapter('extra');
      observed.refusedAfterUnload = await session.run([texts[0]], { adapter: 'extra' }).then(() => null, (e) => e.message);
      observed.direct = await Promise.all(direct);
      await served('B', 2);
      const ownedB = await replace('B', files.increlora, 'increlora');
      await served('B', 3);
      // the owned file adapter of A, replaced while a call holds it: still loaded then, gone after
      for (const [arm, name, file] of [['A', 'sora', owned], ['B', 'increlora', ownedB]]) {
        const r = await whileHeld(arm, async () => {
          const swapped = await router.replaceArm(arm, name);
          observed[`owned${arm}LoadedWhileInFlight`] = session.adapters.has(file.adapter);
          return swapped;
        });
        phases.push({ arm, generation: r.generation, adapter: r.adapter, source: name });
        await served(arm, 4);
      }
      observed.owned = [owned.adapter, ownedB.adapter];
      // refused replaces: a promise rejected naming the problem, the arm keeps its adapter
      observed.refused = [];
      for (const [arm, adapter] of [['Z', null], ['A', 'nope'], ['A', 'adapters/absent.safetensors']]) {
        observed.refused.push(await router.replaceArm(arm, adapter).then(() => null, (e) => e.message));
      }
      observed.keptAfterRefusal = router.adapter('A');
    } finally {
      stop = true;
    }
  }

  const t0 = performance.now();
  const work = [swapper(), ...Array.from({ length: callers }, caller)];
  const outcome = await Promise.allSettled(work);
  close();
  const swapError = outcome[0].status === 'rejected' ? outcome[0].reason.message : null;
  return { calls, phases, failures, swapError, ...observed, loadedAtEnd: [...session.adapters.keys()],
           snapshot: router.snapshot(), inflightAtSwap, ms: performance.now() - t0 };
}
