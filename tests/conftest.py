import threading

import jax
import jax.numpy as jnp
import pytest

# Child scripts that the tests run in their own processes (they set XLA_FLAGS before importing jax).
collect_ignore_glob = ["_*.py"]


def random_walk(saver, state, key, steps, burn_in=0, thin=1, phase=0, dim=3):
    """A small SGLD-like chain under jit + scan; keeps ``i >= burn_in and (i - phase) % thin == 0``.

    Works for one chain or, under vmap, for many (``key``/``phase`` batched).
    Returns the final saving state and every sample it produced, kept or not.
    """

    def step(carry, i):
        state, x, key = carry
        key, sub = jax.random.split(key)
        x = 0.9 * x + 0.1 * jax.random.normal(sub, (dim,))
        keep = (i >= burn_in) & ((i - phase) % thin == 0)
        state, _ = saver.save(state, keep, {"x": x, "stats": (i, jnp.sum(x**2))})
        return (state, x, key), (x, keep)

    (state, _, _), (xs, keeps) = jax.lax.scan(step, (state, jnp.zeros(dim), key), jnp.arange(steps))
    return state, xs, keeps


@pytest.fixture
def sample():
    return {"x": jnp.zeros(3), "stats": (jnp.int32(0), jnp.float32(0))}


@pytest.fixture(autouse=True)
def no_leaked_writer_threads():
    """Every test must leave no jaxsave writer thread behind."""
    yield
    alive = [t for t in threading.enumerate() if t.name.startswith("jaxsave-writer")]
    for t in alive:
        t.join(timeout=5)
    alive = [t for t in alive if t.is_alive()]
    assert not alive, f"writer threads left running: {alive}"
