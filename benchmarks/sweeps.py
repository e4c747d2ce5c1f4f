"""Each sweep on one device and on every local device, in the same run.

    python benchmarks/sweeps.py                   # 2 forced CPU devices unless XLA_FLAGS says
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/sweeps.py --repeats 5

For each sweep entry point (multi-seed training, superposition instances, an SAE sweep, per-layer
transcoders, integrated gradients, occlusion, a patching sweep, path patching, attribution
patching: its batch of examples; evaluate-methods' circuits) the same call runs with
``devices=None`` (one device: the program as before) and ``devices=jax.local_device_count()``,
each compiled first and then timed ``--repeats`` times alternately; prints medians and the ratio
one/all (above 1: the devices help). For evaluate-methods' circuits "one device" is what
``evaluate_methods`` does there by default (every method on each circuit in turn) and "all" is
what it does with ``devices=``: each method once on the stacked circuits, split. The two rows
"one device: ..." compare, both on one device, the loop a sweep replaced (left) with its one
program (right): the per-layer transcoders trained layer by layer, the circuits one by one.

What the ratio means depends on the devices. Forced CPU devices
(--xla_force_host_platform_device_count) are not cores: they share the process's one XLA:CPU
thread pool, so on a machine whose single-device program already keeps every core busy the ratio
is about 1 or below (the split only adds per-device overhead); it rises above 1 where one device
leaves cores idle (small per-step work, a serial scan). GPUs or hosts are separate hardware, and
there the ratio approaches the device count for sweeps whose pieces are large enough. Timings on
a shared machine are noisy: compare ratios measured in the same run.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2").strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tinyinterp as ti  # noqa: E402
from tinyinterp import attribution as A  # noqa: E402
from tinyinterp import evaluate as E  # noqa: E402
from tinyinterp import patching as P  # noqa: E402
from tinyinterp import sae  # noqa: E402
from tinyinterp import superposition as sp  # noqa: E402
from tinyinterp import testing as T  # noqa: E402
from tinyinterp import transcoders as TC  # noqa: E402
from tinyinterp.tasks import get_task  # noqa: E402
from tinyinterp.train import TrainConfig, train_seeds  # noqa: E402

CFG = ti.TransformerConfig(n_layers=2, d_model=64, d_head=16, n_ctx=32, d_vocab=32,
                           attn_only=True)


def sweeps() -> dict:
    """name -> fn(devices) running that sweep once (results fetched to the host)."""
    model = ti.HookedTransformer.from_config(CFG)
    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, CFG.d_vocab)
    corrupt = jax.random.randint(jax.random.key(2), (8, 32), 0, CFG.d_vocab)
    _, cache = model.run_with_cache(tokens)
    metric = A.logit_diff(correct=tokens[:, 0], wrong=(tokens[:, 0] + 1) % CFG.d_vocab)
    task = get_task("induction", d_vocab=CFG.d_vocab, length=8)
    tc = TrainConfig(steps=50, batch_size=16, chunk_size=50, progress=False)
    toy = sp.ToyModelConfig(n_features=20, n_hidden=5, n_instances=16, n_steps=500,
                            batch_size=1024, chunk_size=500)
    x = jax.random.normal(jax.random.key(3), (8192, 64))
    sae_cfgs = [sae.SAEConfig(d_in=64, d_sae=256, batch_size=512, n_steps=200, chunk_size=200,
                              l1_coefficient=lam) for lam in (0.01, 0.03, 0.1, 0.3)]
    batch_fn = sae.array_batch_fn(x, 512, seed=1)
    xs = np.asarray(jax.random.normal(jax.random.key(4), (4, 8192, 64)))  # [layer, n, d_model]
    ys = np.tanh(xs @ np.asarray(jax.random.normal(jax.random.key(5), (64, 64))) / 8)
    circuits = E._circuits(4, 0, with_tracr=False)  # 4 planted circuits of one shape
    methods = {**E.METHODS, **E.BROKEN}

    def circuit_attributions(d):
        if d is None:  # evaluate_methods on one device: each method on each circuit in turn
            return [T.attributions(m, c[1], c[2], c[3]) for c in circuits for m in methods.values()]
        return [E._stacked_attributions(m, stacked, d) for _, stacked in E._circuit_groups(circuits)
                for m in methods.values()]

    tc_kw = dict(batch_size=512, n_steps=200, chunk_size=200, resample_every=100,
                 l1_coefficient=0.01)
    # kept, so that the loop does not compile anew on every call (train_transcoders' loop did:
    # it made a new batch function per layer per call, and compiled programs are kept per one)
    layer_batches = [sae.array_batch_fn(xs[layer], 512, seed=layer, y=ys[layer])
                     for layer in range(4)]

    def transcoders(d, loop=False):
        if loop:  # what train_transcoders did before: each layer's train_sae in turn
            cfg = sae.SAEConfig(d_in=64, d_sae=256, d_out=64, **tc_kw)
            return block([sae.train_sae(cfg, jax.random.key(layer), layer_batches[layer]).params
                          for layer in range(4)])
        return block(TC.train_transcoders(xs, ys, 256, devices=d, **tc_kw).params)

    def block(tree):
        jax.block_until_ready(jax.tree.leaves(tree))
        return tree

    return {
        "train_seeds (4 seeds x 50 steps)":
            lambda d: block(train_seeds(CFG, task, tc, [0, 1, 2, 3], devices=d).params),
        "superposition (16 instances x 500 steps)":
            lambda d: block(sp.train(toy, jax.random.key(0), sp.importance_schedule(20, 0.9),
                                     jnp.full((20,), 0.05), devices=d).params),
        "SAE sweep (4 runs x 200 steps)":
            lambda d: block(sae.train_sae_sweep(sae_cfgs, [jax.random.key(i) for i in range(4)],
                                                batch_fn, devices=d)[0].params),
        "per-layer transcoders (4 layers x 200 steps)": transcoders,
        "evaluate-methods circuits (4 x 8 methods)": circuit_attributions,
        # on one device, the loop the one program replaced ("1 device") against that program
        # ("N devices" column: still one device)
        "  one device: transcoders, loop vs one program":
            lambda d: transcoders(None, loop=d is None),
        "  one device: circuits, loop vs stacked":
            lambda d: circuit_attributions(None if d is None else 1),
        "integrated gradients (64 points)":
            lambda d: block(A.integrated_gradients(model, tokens, metric, steps=64,
                                                   devices=d).values),
        "occlusion (32 windows)":
            lambda d: block(A.occlusion(model, tokens, metric, devices=d).values),
        "patching resid_pre (64 patches)":
            lambda d: block(P.get_act_patch_resid_pre(model, corrupt, cache, metric,
                                                      devices=d).values),
        "path patching (8 heads -> logits, q of layer 1)":
            lambda d: block(P.path_patch(model, corrupt, cache, metric,
                                         [("q", 1, None), "logits"], devices=d).values),
        "attribution patching resid_pre (batch 8)":
            lambda d: block(P.attribution_patch(model, corrupt, cache, metric, "resid_pre",
                                                devices=d).values),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="run the sweeps whose name contains this")
    args = ap.parse_args()
    n = jax.local_device_count()
    print(f"jax {jax.__version__}, {n} local {jax.devices()[0].platform} devices, "
          f"{os.cpu_count()} cores; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if n < 2:
        print("only one device: nothing to compare")
        return
    print(f"{'sweep':48s} {'1 device':>10s} {f'{n} devices':>10s} {'one/all':>8s}")
    for name, fn in sweeps().items():
        if args.only and args.only not in name:
            continue
        times = {None: [], n: []}
        for d in times:
            fn(d)  # compiled before it is timed
        for _ in range(args.repeats):
            for d in times:  # alternately, so load drifts hit both
                t0 = time.perf_counter()
                fn(d)
                times[d].append(time.perf_counter() - t0)
        one, many = statistics.median(times[None]), statistics.median(times[n])
        print(f"{name:48s} {one * 1e3:8.1f}ms {many * 1e3:8.1f}ms {one / many:7.2f}x", flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
