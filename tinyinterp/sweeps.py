"""Sweeps on every device JAX sees, and across hosts, with JAX's own machinery.

Every workload here is a sweep of independent pieces (seeds of a training run, toy-model
instances, SAE sweep points, integrated-gradients points, patches, circuits), and each already
runs as ONE compiled program vmapped over a leading sweep axis. ``devices=`` on an entry point
splits that axis over a one-axis ``jax.sharding.Mesh``: ``jax.shard_map`` runs the same
vmapped program on every device's slice, so nothing about the program changes but its batch.

    devices=None or 1     one device: the program exactly as before (the default)
    devices=N             the first N of ``jax.devices()`` (every process's devices after
                          ``jax.distributed.initialize()``: the same call then runs on all hosts)
    devices=Mesh          that mesh; the sweep axis is split over all of its axes
    devices=[d0, d1, ...] those devices

A sweep whose length the devices do not divide is padded by repeating its last piece, and the
padding is dropped from the results. Results come back to every process as host arrays
(``fetch``), so a script runs unchanged on one host or several. Each device computes the pieces
of its slice exactly as the one-device program computes them (same data, same steps), so
results agree to float32 rounding (bitwise where XLA compiles the per-device batch the same
way; tests/test_sweeps.py checks each entry point).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

SWEEP_AXIS = "sweep"
Devices = int | Mesh | Sequence[Any] | None


def rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[index] ([n, d] rows at int ids [*idx] -> [*idx, d]), split over devices as ``index``
    is: on a mesh with Explicit axes (what ``jax.make_mesh`` makes) a gather must say its output's
    sharding, or it does not trace. Off a mesh it is ``table[index]``."""
    sharding = jax.typeof(index).sharding
    if sharding.mesh.empty or not sharding.mesh.explicit_axes:
        return table[index]
    return table.at[index].get(out_sharding=sharding.update(spec=(*sharding.spec, None)))


def sweep_mesh(devices: Devices) -> Mesh | None:
    """The mesh a sweep is split over, or None for one device (the unchanged default path)."""
    if devices is None or isinstance(devices, Mesh):
        return None if devices is None or devices.size == 1 else devices
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        n, available = int(devices), jax.devices()
        if not 1 <= n <= len(available):
            raise ValueError(f"devices={n}: JAX sees {len(available)} device(s) "
                             f"({available[0].platform}); ask for 1 to {len(available)} (more CPU "
                             "devices: XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                             "JAX starts; more hosts: jax.distributed.initialize())")
        chosen = available[:n]
    elif isinstance(devices, Sequence) and devices and all(isinstance(d, jax.Device)
                                                            for d in devices):
        chosen = list(devices)
    else:
        raise TypeError(f"devices must be None, a device count, a jax.sharding.Mesh or a list of "
                        f"jax devices; got {devices!r}")
    return None if len(chosen) == 1 else Mesh(np.asarray(chosen), (SWEEP_AXIS,))


def add_devices_argument(parser) -> None:
    """The CLI's ``--devices N`` (default 1: one device, results as before)."""
    def count(text: str) -> int:
        n = int(text)
        if n < 1:
            raise ValueError(f"--devices must be >= 1, got {n}")
        return n
    parser.add_argument("--devices", type=count, default=1, metavar="N",
                        help="split the sweep over the first N devices JAX sees (every process's, "
                             "after jax.distributed.initialize()); default: %(default)s")


def n_devices(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.size


def _spec(axis: int | None, mesh: Mesh) -> P:
    """The PartitionSpec of an array whose sweep axis is ``axis`` (None: not swept, replicated)."""
    if axis is None:
        return P()
    return P(*([None] * axis), tuple(mesh.axis_names))


_COMPILED: dict = {}  # key -> compiled sweep, for callers whose fn is a fresh closure per call
_MAX_COMPILED = 64


def compile_sweep(fn: Callable, mesh: Mesh | None, in_axes: Any, out_axes: Any = 0, *,
                  donate_argnums: int | tuple[int, ...] = (), key: Any = None) -> Callable:
    """``fn`` (a program already vmapped over its sweep axis) compiled: ``jax.jit(fn)`` for one
    device, else ``jax.jit(jax.shard_map(fn, ...))`` with each argument's and result's sweep
    axis split over ``mesh``. ``in_axes`` / ``out_axes``: as ``jax.vmap``'s (a prefix of the
    arguments / results: the position of the sweep axis, or None for arguments every device
    gets whole). ``key`` (hashable): the compiled sweep is kept under it, so a caller that
    builds ``fn`` anew per call (a closure over static settings, all of which ``key`` names)
    compiles once, not every call."""
    if key is not None:
        full = (key, mesh, in_axes, out_axes, donate_argnums)
        if full not in _COMPILED:
            if len(_COMPILED) >= _MAX_COMPILED:
                _COMPILED.pop(next(iter(_COMPILED)))  # the oldest
            _COMPILED[full] = compile_sweep(fn, mesh, in_axes, out_axes,
                                            donate_argnums=donate_argnums)
        return _COMPILED[full]
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    specs = functools.partial(jax.tree.map, lambda a: _spec(a, mesh),
                              is_leaf=lambda a: a is None)
    in_specs = specs(tuple(in_axes) if isinstance(in_axes, list) else in_axes)
    # check_vma=False: every piece of a sweep is independent (no collective, every result split
    # over the sweep axis), so there is nothing for the replication check to check; and with it
    # on, jax 0.10.2 fails on typed PRNG keys vmapped inside shard_map (random.fold_in of a
    # per-seed key by a shared step: "pvary is a invariant->variant collective").
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=specs(out_axes),
                                 check_vma=False), donate_argnums=donate_argnums)


def padded_length(n: int, mesh: Mesh | None) -> int:
    d = n_devices(mesh)
    return -(-n // d) * d


def pad(tree: Any, mesh: Mesh | None, axis: int = 0) -> Any:
    """Every leaf's sweep axis (``axis``) padded to a multiple of the device count by repeating
    its last entry (a piece computed twice and dropped later, never a made-up one)."""
    def one(x):
        n = np.shape(x)[axis]
        extra = padded_length(n, mesh) - n
        if not extra:
            return x
        last = jax.numpy.take(x, np.full((extra,), n - 1), axis=axis)
        return jax.numpy.concatenate([x, last], axis=axis)
    return tree if mesh is None else jax.tree.map(one, tree)


def put(tree: Any, mesh: Mesh | None, axis: int = 0) -> Any:
    """Every leaf placed with its sweep axis (``axis``, or None: whole on every device) split
    over ``mesh``. Works across processes: each process passes the same values and keeps its
    devices' slices (``jax.make_array_from_callback``)."""
    if mesh is None:
        return tree

    def one(x):
        host = np.asarray(jax.device_get(x)) if not _is_key(x) else x
        sharding = NamedSharding(mesh, _spec(axis, mesh))
        if _is_key(x):  # typed PRNG keys: place their key data, then wrap again
            data = put(jax.random.key_data(x), mesh, axis)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.tree.map(one, tree)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key)


def fetch(tree: Any, n: int | None = None, axis: int = 0) -> Any:
    """Every leaf as a host array on every process (gathered from the other hosts when it spans
    them), its sweep axis cut back to ``n`` (the length before padding)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        x = np.asarray(x)
        return x if n is None else np.take(x, np.arange(n), axis=axis)
    return jax.tree.map(one, tree)


def map_sweep(fn: Callable, args: tuple, in_axes: Any, devices: Devices, out_axes: Any = 0, *,
              key: Any = None) -> Any:
    """``fn(*args)`` for a program vmapped over a sweep axis, split over ``devices``: padded,
    placed, run and fetched back (cut to the sweep's length). One device: ``jax.jit(fn)(*args)``
    exactly. The sweep axis of the arguments is ``in_axes`` (as vmap's); of the results,
    ``out_axes`` (None: a result every device computes whole, e.g. an unpatched run's metric).
    ``key``: as ``compile_sweep``'s (name every static setting ``fn`` closes over, or leave
    None to compile per call)."""
    mesh = sweep_mesh(devices)
    if mesh is None:
        return compile_sweep(fn, None, in_axes, out_axes, key=key)(*args)
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    lengths = {np.shape(leaf)[a] for arg, a in zip(args, axes, strict=True) if a is not None
               for leaf in jax.tree.leaves(arg)}
    if len(lengths) != 1:
        raise ValueError(f"the swept arguments disagree on the sweep's length: {sorted(lengths)}")
    n = lengths.pop()
    placed = tuple(put(arg if a is None else pad(arg, mesh, a), mesh, a)
                   for arg, a in zip(args, axes, strict=True))
    out = compile_sweep(fn, mesh, tuple(axes), out_axes, key=key)(*placed)
    if isinstance(out_axes, int):
        return fetch(out, n, out_axes)
    return jax.tree.map(lambda a, o: fetch(o) if a is None else fetch(o, n, a), out_axes, out,
                        is_leaf=lambda a: a is None or isinstance(a, int))


# ----------------------------------------------------------------------------- several processes
# ``python -m tinyinterp.sweeps demo --processes 2``: the runnable example of one sweep run by
# several processes (hosts) after ``jax.distributed.initialize()``, on this machine's loopback.
# Each process starts with one CPU device, so the sweep's mesh spans the processes; each prints
# the sweep's losses (gathered to every process), and the parent checks them against the same
# sweep in one process. Bounded: the parent kills the workers after --timeout seconds.

def _demo_sweep(devices) -> dict:
    """A small sweep (6 superposition instances) and its losses."""
    from tinyinterp import superposition as sp

    cfg = sp.ToyModelConfig(n_features=5, n_hidden=2, n_instances=6, n_steps=40, batch_size=32,
                            chunk_size=20)
    res = sp.train(cfg, jax.random.key(0), sp.importance_schedule(5, 0.9),
                   sp.feature_probability_schedule(6)[:, None] * np.ones((1, 5), np.float32),
                   devices=devices)
    return {"losses": np.asarray(res.losses).tolist()}


def _worker(process_id: int, n_processes: int, coordinator: str) -> None:
    import json

    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n_processes,
                               process_id=process_id, initialization_timeout=60)
    try:
        out = _demo_sweep(jax.device_count())
        out.update(process=jax.process_index(), devices=jax.device_count(),
                   local_devices=jax.local_device_count())
        print("RESULT " + json.dumps(out), flush=True)
    finally:
        jax.distributed.shutdown()


def demo(n_processes: int = 2, timeout: float = 300.0) -> dict:
    """Run ``_demo_sweep`` on ``n_processes`` processes on 127.0.0.1 (one CPU device each) and in
    this process; returns {"results": per process, "reference": one process, "max_rel_diff"}.
    Raises RuntimeError if a worker fails or the run outlasts ``timeout`` seconds."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a free port on the loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                 if "device_count" not in f)}
    procs = [subprocess.Popen([sys.executable, "-m", "tinyinterp.sweeps", "worker", str(i),
                               str(n_processes), f"127.0.0.1:{port}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n_processes)]
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            try:
                outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"the {n_processes}-process sweep did not finish in "
                                   f"{timeout:.0f} s; the workers were stopped") from e
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, (stdout, stderr) in zip(procs, outs, strict=True):
        line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            raise RuntimeError(f"a worker failed (exit {p.returncode}):\n{stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    reference = _demo_sweep(None)["losses"]
    ref = np.asarray(reference)
    diff = max(float(np.max(np.abs(np.asarray(r["losses"]) - ref) / np.maximum(np.abs(ref), 1e-30)))
               for r in results)
    return {"results": results, "reference": reference, "max_rel_diff": diff}


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["worker"]:
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1:2] == ["demo"]:
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 2
        r = demo(n)
        for row in r["results"]:
            print(f"process {row['process']}: {row['local_devices']} of {row['devices']} devices")
        print(f"the sweep's losses on {n} processes vs one: max relative difference "
              f"{r['max_rel_diff']:.2e}")
    else:
        sys.exit("usage: python -m tinyinterp.sweeps demo [N_PROCESSES]")
