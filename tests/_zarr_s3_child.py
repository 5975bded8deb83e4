"""Stream tests/_zarr_sampler.py's chains to a Zarr store on S3; started (and SIGKILLed) by
tests/reliability/test_zarr_s3_kill.py.

    python _zarr_s3_child.py ENDPOINT_URL STORE_URL STEPS

Checkpoints every ``ROUND`` steps; prints ``streaming`` after the first round and
``round R`` after each, then sleeps 10 ms (a sampler that takes its time), so the parent
can kill it at a chosen round, whatever the machine's speed.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from _s3 import storage_options_for  # noqa: E402
from _zarr_sampler import CHAINS, ROUND, STATS, initial, kept, run, sample_template  # noqa: E402

import jaxsave  # noqa: E402

endpoint, url, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
collector = jaxsave.ZarrCollector(
    url, sample_stats=STATS, storage_options=storage_options_for(endpoint), checkpoint_interval=0.1
)
saver = jaxsave.save(collector, block_size=4, checkpoint_every=ROUND)
state = saver.init(
    sample_template(), initial(), jaxsave.static_information(samples_collected=kept(steps)), chains=CHAINS
)


def pace(r):
    if r == 0:
        print("streaming", flush=True)
    print(f"round {r}", flush=True)
    time.sleep(0.01)


state, _ = run(saver, state, initial(), 0, steps, on_round=pace)
saver.postprocess(state, None)
print("done", flush=True)
