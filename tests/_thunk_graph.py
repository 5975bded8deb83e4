"""The XLA:CPU thunk graph of a compiled loop body, and whether its executor splits it over threads.

XLA:CPU runs a loop body's thunks (its kernels, copies, conditionals) by their data
dependencies. Whenever more than ``SPLIT_THRESHOLD`` (8) thunks are ready at once, the executor
hands half of them to another thread of its pool, at every step of the loop
(``xla/backends/cpu/runtime/thunk_executor.cc``, ``Thunk::ExecuteSession::kSplitThreshold``):
for a step of a few microseconds that costs 1-3 us a step of wall time and doubles the CPU time.
The executor logs each graph it builds (``TF_CPP_VMODULE=thunk_executor=6``); :func:`graphs`
parses that log and :func:`most_ready` replays one thread's first-in-first-out walk of a graph
(the executor's default ready queue), so a test can check that no step is split.

Run as a script (``python tests/_thunk_graph.py CASE ...``), it compiles the step of
``benchmarks/peer.py`` (10 floats, the key split in the carry, ``save()`` in the user's scan)
for each case ``{hdf5|ckpt}-{light|heavy}-{thin|all}`` (one chain; ``all``: ``keep=True``) or
``...-{chains}`` (vmapped), printing a line ``@@ CASE`` before each compilation's log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque

SPLIT_THRESHOLD = 8

_GRAPH = re.compile(r"ThunkExecutor: #thunks=(\d+)")
_THUNK = re.compile(r"\s*thunk #(\d+): op_name=(\S+), kind=(\w+), dependencies=\[(.*?)\]")


def graphs(log: str) -> list[list[tuple[str, str, list[str]]]]:
    """Every graph in ``log``: its thunks as ``(name, kind, dependencies)``, in order."""
    out: list[list[tuple[str, str, list[str]]]] = []
    for line in log.splitlines():
        if _GRAPH.match(line):
            out.append([])
        elif out and (m := _THUNK.match(line)):
            out[-1].append((m.group(2), m.group(3), [d.strip() for d in m.group(4).split(",") if d.strip()]))
    return out


def most_ready(graph: list[tuple[str, str, list[str]]]) -> int:
    """The most thunks left ready after the executor takes one, on one thread, first in first out."""
    index = {name: i for i, (name, _, _) in enumerate(graph)}
    waiting = [len(deps) for _, _, deps in graph]
    users: list[list[int]] = [[] for _ in graph]
    for i, (_, _, deps) in enumerate(graph):
        for d in deps:
            users[index[d]].append(i)
    ready = deque(i for i, n in enumerate(waiting) if n == 0)
    most = 0
    while ready:
        i = ready.popleft()
        most = max(most, len(ready))
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    return most


def loop_bodies(log: str) -> list[list[tuple[str, str, list[str]]]]:
    """The graphs in ``log`` of a body that writes the ring buffer and holds the flush's cond."""
    return [
        g
        for g in graphs(log)
        if any(kind == "conditional" for _, kind, _ in g)
        and any("dynamic-update-slice" in n for n, _, _ in g)
    ]


def compile_cases(cases: list[str], env: dict | None = None) -> dict[str, str]:
    """The executor's log of each case, compiled in a child process (the log is C++ stderr)."""
    import jaxsave  # the child imports the jaxsave this process imported

    root = os.path.dirname(os.path.dirname(os.path.abspath(jaxsave.__file__)))
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TF_CPP_MIN_LOG_LEVEL": "0",
        "TF_CPP_VMODULE": "thunk_executor=6",
        "JAX_PLATFORMS": "cpu",
    }
    env.pop("XLA_FLAGS", None)  # one CPU device, as a plain run
    done = subprocess.run(
        [sys.executable, __file__, *cases], env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"the child failed:\n{done.stdout}\n{done.stderr[-4000:]}")
    parts = re.split(r"^@@ (\S+)$", done.stderr, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _compile(case: str) -> None:
    import jax
    import jax.numpy as jnp

    import jaxsave

    kind, body, thin, *vmapped = case.split("-")
    steps, every, chains = 1000, 1 if thin == "all" else int(thin), int(vmapped[0]) if vmapped else None
    saver = jaxsave.save(jaxsave.MemoryCollector(), **({"checkpoint_every": 500} if kind == "ckpt" else {}))
    x0 = jnp.zeros(10 if chains is None else (chains, 10))
    state = saver.init({"x": x0}, {"x": x0} if kind == "ckpt" else None, chains=chains)

    def run(state, x, key, keys):
        def step(carry, inp):
            state, x, key = carry
            i, k = inp
            if body == "heavy":  # the key split in the carry, else precomputed keys
                key, k = jax.random.split(key)
            x = x - 1e-3 * x + 1e-2 * jax.random.normal(k, x.shape, x.dtype)
            ckpt = {"solver_state": {"x": x}} if kind == "ckpt" else {}
            keep = True if thin == "all" else i % every == 0  # "all": a constant True, as many users write
            return (saver.save(state, keep, {"x": x}, **ckpt)[0], x, key), None

        state, x, _ = jax.lax.scan(step, (state, x, key), (jnp.arange(steps), keys))[0]
        return state, x  # as benchmarks/peer.py's loop: what the loop returns changes its copies

    key = jax.random.key(0)
    args = (state, x0, key, jax.random.split(key, steps))
    if chains is not None:  # vmapped chains, as benchmarks/peer.py runs them
        run = jax.vmap(run)
        key = jax.random.split(key, chains)
        args = (state, x0, key, jax.vmap(lambda k: jax.random.split(k, steps))(key))
    print(f"@@ {case}", file=sys.stderr, flush=True)
    compiled = jax.jit(run).lower(*args).compile()
    print("@@ end", file=sys.stderr, flush=True)
    saver.postprocess(compiled(*args)[0])


if __name__ == "__main__":
    for case in sys.argv[1:]:
        _compile(case)
