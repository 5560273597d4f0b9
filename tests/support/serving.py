"""Serving from several threads while the A/B arms are swapped: shared by the runtime tests of
every runtime."""

from __future__ import annotations

import threading

import numpy as np


def serve_with_arm_swaps(router, requests, expected, by_fingerprint, arms: dict, paths: dict,
                         threads: int, per_thread: int, atol: float) -> tuple[list, int]:
    """``threads`` callers route ``per_thread`` requests each while the main thread replaces the
    swappable arms over and over. ``arms``: arm → the adapter it serves (None: the base);
    ``paths``: arm → the file ``replace_arm`` reloads; ``expected``: adapter → outputs per request.
    A caller's k-th request waits until k // 4 swaps were made, so swaps interleave the requests
    however fast the model is.
    Returns (failures: (arm, adapter that answered), swaps)."""
    failures, done = [], [0]
    swapped = threading.Condition()  # guards done[0]: swaps so far; a caller's k-th request waits for k // 4 swaps

    def serve(t):
        for k in range(per_thread):
            with swapped:
                swapped.wait_for(lambda: done[0] >= k // 4, timeout=30)
            i = (t + k) % len(requests)
            routed = router.run(f"u{t}-{k}", requests[i])
            name = by_fingerprint.get(routed.result.fingerprint)
            want = arms[routed.arm]
            if name != want or np.abs(routed.outputs[0] - expected[want][i]).max() > atol:
                failures.append((routed.arm, name))

    workers = [threading.Thread(target=serve, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    swaps, order = 0, sorted(paths)
    while any(w.is_alive() for w in workers):
        arm = order[swaps % len(order)]
        router.replace_arm(arm, paths[arm])
        swaps += 1
        with swapped:
            done[0] = swaps
            swapped.notify_all()
    for w in workers:
        w.join()
    return failures, swaps
