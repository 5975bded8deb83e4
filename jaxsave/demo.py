"""``jaxsave demo``: SGLD for Bayesian logistic regression on real data, streamed to HDF5 or Zarr.

The data set is scikit-learn's bundled Wisconsin breast-cancer data (569 tumours,
30 features, benign or malignant), read from the installed package: nothing is
downloaded. The features are standardized and decorrelated (PCA whitening, so
that plain SGLD mixes in every direction), and the model is

    b ~ N(0, 1),  w ~ N(0, I_30),  y_i ~ Bernoulli(sigmoid(x_i @ w + b)).

Several chains run under ``jax.vmap`` inside one ``jax.jit``-compiled
``lax.scan``; each step takes a minibatch gradient and a Langevin step, and
``jaxsave.save`` keeps a sample after the burn-in on every ``thin``-th step.
The samples stream to ``chains.h5`` (to a Zarr store with ``--output chains.zarr``,
or to host memory, or they stay on the device), then the demo reads them back and
prints posterior means, R-hat and effective sample sizes (with ArviZ when installed,
else with :func:`split_rhat` and :func:`effective_sample_size`).

Run it with ``jaxsave demo`` or ``python -m jaxsave demo``; ``--help`` lists
the options. From Python:

>>> import os, tempfile
>>> from jaxsave import demo
>>> path = os.path.join(tempfile.mkdtemp(), "chains.h5")
>>> result = demo.run(chains=2, steps=400, burn_in=100, thin=5, output=path, progress=False, quiet=True)
>>> result.sample_counts.tolist(), sorted(result.samples)
([60, 60], ['b', 'lp', 'w'])
>>> result.samples["w"].shape
(2, 60, 30)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, NamedTuple, TextIO

import numpy as np

from jaxsave._store import arviz as _arviz

__all__ = [
    "DemoResult",
    "load_data",
    "run",
    "summarize",
    "print_report",
    "split_rhat",
    "effective_sample_size",
    "add_arguments",
    "run_from_args",
    "main",
]

COLLECTORS = ("hdf5", "zarr", "memory", "no_save")
#: An output whose name ends so is a Zarr store (the collector ``"zarr"``), any other an HDF5 file.
ZARR_SUFFIX = ".zarr"


class DemoResult(NamedTuple):
    """What :func:`run` returns: the samples read back, per-parameter summary rows, timings."""

    samples: dict[str, np.ndarray]  # "w" (chain, draw, 30), "b" (chain, draw), "lp" (chain, draw)
    sample_counts: np.ndarray
    summary: list[dict[str, Any]]  # one row per parameter: name, mean, sd, ess_bulk, ess_tail, r_hat
    accuracy: float  # posterior-predictive accuracy on the data
    seconds_compile: float
    seconds_run: float
    output: str | None


# -- data -----------------------------------------------------------------------------------------


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """The breast-cancer features, standardized and whitened (569 x 30, float32), and the 0/1 labels.

    >>> x, y = load_data()
    >>> x.shape, y.shape, bool(abs(x.T @ x / len(x) - np.eye(30)).max() < 1e-4)
    ((569, 30), (569,), True)
    """
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo needs scikit-learn for its data set: pip install 'jaxsave[demo]'"
        ) from error
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    x = x @ vt.T * (math.sqrt(len(x)) / s)  # principal components with unit variance
    return x.astype(np.float32), y.astype(np.float32)


# -- diagnostics without ArviZ --------------------------------------------------------------------


def split_rhat(draws: np.ndarray) -> float:
    """The split-R-hat of ``draws`` shaped ``(chain, draw)`` (Gelman et al., BDA3, 11.4).

    >>> rng = np.random.default_rng(0)
    >>> round(split_rhat(rng.normal(size=(4, 1000))), 2)
    1.0
    >>> split_rhat(rng.normal(size=(4, 1000)) + np.arange(4)[:, None]) > 1.5
    True
    """
    n = draws.shape[1] // 2
    halves = np.concatenate([draws[:, :n], draws[:, n : 2 * n]], axis=0).astype(np.float64)
    within = halves.var(axis=1, ddof=1).mean()
    between = n * halves.mean(axis=1).var(ddof=1)
    var_plus = (n - 1) / n * within + between / n
    return float(np.sqrt(var_plus / within)) if within > 0 else float("nan")


def effective_sample_size(draws: np.ndarray) -> float:
    """Effective sample size of the mean of ``draws`` shaped ``(chain, draw)``.

    Stan's estimator (BDA3, 11.5): chains are split in halves, autocorrelations
    combined over chains, and summed with Geyer's initial monotone sequence.

    >>> rng = np.random.default_rng(0)
    >>> 3000 < effective_sample_size(rng.normal(size=(4, 1000))) < 5000
    True
    >>> ar = np.zeros((4, 1000))
    >>> for t in range(1, 1000):
    ...     ar[:, t] = 0.9 * ar[:, t - 1] + rng.normal(size=4)
    >>> 100 < effective_sample_size(ar) < 400  # about 4000 * (1 - 0.9) / (1 + 0.9) = 211
    True
    """
    x = np.asarray(draws, np.float64)
    half = x.shape[1] // 2
    x = np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)
    m, n = x.shape
    if n < 2 or np.ptp(x) < np.finfo(float).resolution:
        return float(x.size) if n >= 2 else float("nan")
    centered = x - x.mean(axis=1, keepdims=True)
    size = 2 ** math.ceil(math.log2(2 * n))
    f = np.fft.rfft(centered, size, axis=1)
    acov = np.fft.irfft(f * np.conj(f), size, axis=1)[:, :n] / n  # biased autocovariance per chain
    mean_var = acov[:, 0].mean() * n / (n - 1)
    var_plus = mean_var * (n - 1) / n + x.mean(axis=1).var(ddof=1)
    rho = 1.0 - (mean_var - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    # Geyer's initial positive sequence: pairs (rho[t], rho[t+1]), t even, while their sum is positive ...
    kept = np.zeros(n)
    kept[:2] = rho[:2]
    t, even, odd = 1, 1.0, rho[1]
    while t < n - 3 and even + odd > 0:
        even, odd = rho[t + 1], rho[t + 2]
        if even + odd >= 0:
            kept[t + 1 : t + 3] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        kept[max_t + 1] = even
    # ... made monotone.
    t = 1
    while t <= max_t - 2:
        if kept[t + 1] + kept[t + 2] > kept[t - 1] + kept[t]:
            kept[t + 1] = kept[t + 2] = (kept[t - 1] + kept[t]) / 2
        t += 2
    tau = -1.0 + 2.0 * kept[: max_t + 1].sum() + kept[max_t + 1 : max_t + 2].sum()
    return float(m * n / max(tau, 1.0 / math.log10(m * n)))


def summarize(samples: dict[str, np.ndarray], names: list[str] | None = None) -> list[dict[str, Any]]:
    """One summary row per scalar parameter of ``samples`` (``(chain, draw, ...)`` arrays).

    Uses ``arviz.summary`` (rank-normalized R-hat, bulk and tail ESS) when ArviZ is
    installed, else :func:`split_rhat` and :func:`effective_sample_size` (then
    ``ess_tail`` is ``nan``).
    """
    names = list(samples) if names is None else names
    try:
        import arviz as az
    except ImportError:
        az = None  # type: ignore[assignment]
    if az is not None:
        idata = _arviz.from_groups({"posterior": {k: np.asarray(samples[k]) for k in names}})
        table = az.summary(idata, kind="all", round_to="none")
        return [
            {
                "name": str(name),
                "mean": float(row["mean"]),
                "sd": float(row["sd"]),
                "ess_bulk": float(row["ess_bulk"]),
                "ess_tail": float(row["ess_tail"]),
                "r_hat": float(row["r_hat"]),
            }
            for name, row in table.iterrows()
        ]
    rows = []
    for key in names:
        arr = np.asarray(samples[key], np.float64)
        flat = arr.reshape(arr.shape[0], arr.shape[1], -1)
        for j in range(flat.shape[2]):
            index = ", ".join(map(str, np.unravel_index(j, arr.shape[2:])))
            label = key if arr.ndim == 2 else f"{key}[{index}]"
            draws = flat[:, :, j]
            rows.append(
                {
                    "name": label,
                    "mean": float(draws.mean()),
                    "sd": float(draws.std(ddof=1)),
                    "ess_bulk": effective_sample_size(draws),
                    "ess_tail": float("nan"),
                    "r_hat": split_rhat(draws),
                }
            )
    return rows


# -- the sampler ----------------------------------------------------------------------------------


def run(
    chains: int = 4,
    steps: int = 60_000,
    burn_in: int = 10_000,
    thin: int = 25,
    step_size: float = 6e-3,
    batch_size: int = 64,
    output: str | os.PathLike | None = None,
    collector: str | None = None,
    seed: int = 0,
    progress: bool = True,
    quiet: bool = False,
    out: TextIO | None = None,
) -> DemoResult:
    """Run the demo's SGLD chains and return the samples and their summary; see the module docstring.

    ``collector`` is ``"hdf5"`` (stream to the file ``output``, default ``chains.h5``),
    ``"zarr"`` (to the Zarr store ``output``, default ``chains.zarr``; needs
    ``pip install 'jaxsave[zarr]'``), ``"memory"`` (host memory) or ``"no_save"`` (every
    sample stays on the device until the end; no progress bar, since nothing leaves the
    device during the run). By default it is ``"zarr"`` when ``output`` ends in ``.zarr``,
    else ``"hdf5"``.
    """
    import jax
    import jax.numpy as jnp

    import jaxsave

    collector, output = _where(collector, output)
    for name, value, low in (
        ("chains", chains, 1),
        ("steps", steps, 1),
        ("burn_in", burn_in, 0),
        ("thin", thin, 1),
        ("batch_size", batch_size, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if burn_in >= steps:
        raise ValueError(f"burn_in ({burn_in}) must be smaller than steps ({steps})")
    out = sys.stdout if out is None else out
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=out, flush=True))

    x_np, y_np = load_data()
    n_data, dim = x_np.shape
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    kept = len(range(burn_in, steps, thin))

    say(f"jaxsave demo: Bayesian logistic regression, breast-cancer data ({n_data} x {dim}), SGLD")
    say(
        f"  {chains} chain{'s' if chains > 1 else ''} x {steps} steps (burn-in {burn_in}, "
        f"thin {thin}: {kept} draws per chain), minibatch {batch_size}, step size {step_size:g}"
    )
    say(f"  collector: {collector}" + (f" -> {output}" if output else ""))

    if collector == "no_save":
        saver = jaxsave.no_save()
    else:
        sink: jaxsave.DataCollector
        if collector == "hdf5":
            sink = jaxsave.HDF5Collector(output, sample_stats=("lp",))
        elif collector == "zarr":
            sink = jaxsave.ZarrCollector(output, sample_stats=("lp",))
        else:
            sink = jaxsave.MemoryCollector()
        # About 50 flushes for a smooth bar at negligible cost (a block holds kept draws, not steps).
        block = max(1, min(4096, kept // 50))
        saver = jaxsave.save(sink, block_size=block, progress=steps if progress else False)

    def log_posterior(params: dict, xb: jax.Array, yb: jax.Array) -> jax.Array:
        """Minibatch estimate of the log posterior (likelihood scaled to the full data)."""
        logits = xb @ params["w"] + params["b"]
        loglik = jnp.sum(yb * jax.nn.log_sigmoid(logits) + (1 - yb) * jax.nn.log_sigmoid(-logits))
        logprior = -0.5 * (jnp.sum(params["w"] ** 2) + params["b"] ** 2)
        return n_data / xb.shape[0] * loglik + logprior

    value_and_grad = jax.value_and_grad(log_posterior)

    def sgld_step(carry: tuple, i: jax.Array) -> tuple[tuple, None]:
        state, params, key = carry
        key, k_batch, k_w, k_b = jax.random.split(key, 4)
        idx = jax.random.randint(k_batch, (batch_size,), 0, n_data)
        lp, grad = value_and_grad(params, x[idx], y[idx])
        noise = {"w": jax.random.normal(k_w, (dim,)), "b": jax.random.normal(k_b, ())}
        params = jax.tree.map(
            lambda p, g, z: p + 0.5 * step_size * g + jnp.sqrt(step_size) * z, params, grad, noise
        )
        keep = (i >= burn_in) & ((i - burn_in) % thin == 0)
        state, _ = saver.save(state, keep, {**params, "lp": lp})
        return (state, params, key), None

    def chain(state: Any, key: jax.Array) -> Any:
        k_init, key = jax.random.split(key)
        params = {"w": jax.random.normal(k_init, (dim,)), "b": jnp.float32(0.0)}  # overdispersed start
        (state, _, _), _ = jax.lax.scan(sgld_step, (state, params, key), jnp.arange(steps))
        return state

    template = {"w": jnp.zeros((chains, dim)), "b": jnp.zeros(chains), "lp": jnp.zeros(chains)}
    state = saver.init(template, None, jaxsave.static_information(samples_collected=kept), chains=chains)
    keys = jax.random.split(jax.random.key(seed), chains)
    sampler = jax.jit(jax.vmap(chain))

    start = time.perf_counter()
    compiled = sampler.lower(state, keys).compile()
    seconds_compile = time.perf_counter() - start
    start = time.perf_counter()
    state = jax.block_until_ready(compiled(state, keys))
    result = saver.postprocess(state, None)
    seconds_run = time.perf_counter() - start

    counts = np.asarray(result["sample_count"]).reshape(-1)
    if output is not None:
        samples = jaxsave.load_samples(output)  # type: ignore[arg-type]  # read back from the file, as an analysis would
    else:
        samples = result["samples"]
    samples = {k: np.asarray(v) for k, v in samples.items()}
    summary = summarize(samples, ["b", "w"])

    weights = samples["w"].reshape(-1, dim)
    bias = samples["b"].reshape(-1)
    prob = 1.0 / (1.0 + np.exp(-(x_np @ weights.T + bias)))  # (data, draws)
    accuracy = float(((prob.mean(axis=1) > 0.5) == (y_np > 0.5)).mean())

    if not quiet:
        print_report(summary, counts, accuracy, seconds_compile, seconds_run, chains * steps, output, out)
    return DemoResult(samples, counts, summary, accuracy, seconds_compile, seconds_run, output)


def _where(collector: str | None, output: str | os.PathLike | None) -> tuple[str, str | None]:
    """The collector and its output path (``None`` for memory and the device), checked."""
    path = None if output is None else os.fspath(output)
    zarr_name = path is not None and path.rstrip("/").endswith(ZARR_SUFFIX)
    if collector is None:
        collector = "zarr" if zarr_name else "hdf5"
    if collector not in COLLECTORS:
        raise ValueError(f"collector must be one of {COLLECTORS}, got {collector!r}")
    if collector == "hdf5" and zarr_name:
        raise ValueError(
            f"the output {path!r} names a Zarr store ({ZARR_SUFFIX}), but the collector is hdf5: "
            "drop --collector hdf5 (or use --collector zarr), or name an HDF5 file such as chains.h5"
        )
    if collector not in ("hdf5", "zarr"):
        return collector, None
    default = "chains.h5" if collector == "hdf5" else f"chains{ZARR_SUFFIX}"
    return collector, path if path is not None else default


def _fmt(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def print_report(
    summary: list[dict[str, Any]],
    counts: np.ndarray,
    accuracy: float,
    seconds_compile: float,
    seconds_run: float,
    chain_steps: int,
    output: str | None,
    out: TextIO,
) -> None:
    """Print the per-parameter table and the throughput lines."""
    print(file=out)
    header = f"{'parameter':<10} {'mean':>8} {'sd':>7} {'ess_bulk':>9} {'ess_tail':>9} {'r_hat':>6}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in summary:
        print(
            f"{row['name']:<10} {_fmt(row['mean'], 3):>8} {_fmt(row['sd'], 3):>7} "
            f"{_fmt(row['ess_bulk'], 0):>9} {_fmt(row['ess_tail'], 0):>9} "
            f"{_fmt(row['r_hat'], 3):>6}",
            file=out,
        )
    rhat = [r["r_hat"] for r in summary if math.isfinite(r["r_hat"])]
    ess = [r["ess_bulk"] for r in summary if math.isfinite(r["ess_bulk"])]
    total = int(counts.sum())
    print(file=out)
    if rhat and ess:
        met = max(rhat) < 1.01 and min(ess) > 400
        verdict = "met" if met else "not met: run longer with --steps"
        print(
            f"worst r_hat {max(rhat):.3f}, smallest ess_bulk {min(ess):.0f} "
            f"(the usual targets, r_hat < 1.01 and ess_bulk > 400: {verdict})",
            file=out,
        )
    print(f"posterior-predictive accuracy on the data: {accuracy:.1%}", file=out)
    print(
        f"{total} samples kept ({counts.tolist()} per chain) in {seconds_run:.2f} s: "
        f"{total / seconds_run:,.0f} samples/s, {chain_steps / seconds_run:,.0f} chain-steps/s "
        f"(compile {seconds_compile:.1f} s)",
        file=out,
    )
    if output:
        print(
            f"samples are in {output}; next: `jaxsave inspect {output}`, or in Python "
            f"`az.summary(jaxsave.to_inference_data({output!r}))`",
            file=out,
        )


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (used by ``jaxsave demo``)."""
    parser.add_argument("--chains", type=int, default=4, help="chains, vmapped (default 4)")
    parser.add_argument("--steps", type=int, default=60_000, help="SGLD steps per chain (default 60000)")
    parser.add_argument("--burn-in", type=int, default=10_000, help="steps discarded first (default 10000)")
    parser.add_argument(
        "--thin", type=int, default=25, help="keep every n-th step after burn-in (default 25)"
    )
    parser.add_argument("--step-size", type=float, default=6e-3, help="SGLD step size (default 0.006)")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size (default 64)")
    parser.add_argument(
        "--output",
        default=None,
        help="the HDF5 file, or the Zarr store when it ends in .zarr (default chains.h5)",
    )
    parser.add_argument(
        "--collector",
        choices=COLLECTORS,
        default=None,
        help="where samples go: an HDF5 file, a Zarr store, host memory, or the device "
        "(default: zarr when --output ends in .zarr, else hdf5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo with parsed command-line options; returns the exit code."""
    try:
        run(
            chains=args.chains,
            steps=args.steps,
            burn_in=args.burn_in,
            thin=args.thin,
            step_size=args.step_size,
            batch_size=args.batch_size,
            output=args.output,
            collector=args.collector,
            seed=args.seed,
            progress=args.progress,
        )
    except (ValueError, ImportError) as error:
        print(f"jaxsave demo: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxsave.demo [options]``: the same as ``jaxsave demo``."""
    parser = argparse.ArgumentParser(prog="jaxsave demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
