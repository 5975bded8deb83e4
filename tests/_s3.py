"""A real S3-compatible server on loopback for the tests: moto's server mode, in its own process.

``S3Server()`` starts ``moto.server.ThreadedMotoServer`` in a child Python process on
a free loopback port (the child binds port 0 and reports the port it got, so no
other process can take it in between), and stops it on ``close()`` (the child
also exits when its stdin closes, so a killed test run leaves no server behind).
``server.bucket()`` creates a new bucket and returns an :class:`S3Bucket`: its
``url`` (``s3://<bucket>``), the fsspec ``storage_options`` that reach the server,
and an ``s3fs.S3FileSystem`` on it.

The fixtures ``s3_server`` (one per test session) and ``s3_bucket`` (one new bucket
per test) live in ``tests/conftest.py``; child processes reach the same server with
:func:`storage_options_for`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
import tempfile
from typing import Any

START_TIMEOUT_S = 60

_CHILD = r"""
import sys
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes our stdin (or dies)
server.stop()
"""

KEY, SECRET, REGION = "testing-key", "testing-secret", "eu-west-1"


def storage_options_for(endpoint_url: str) -> dict[str, Any]:
    """fsspec/s3fs ``storage_options`` for the loopback server at ``endpoint_url``."""
    return {
        "endpoint_url": endpoint_url,
        "key": KEY,
        "secret": SECRET,
        "anon": False,
        "client_kwargs": {"region_name": REGION},
    }


@dataclasses.dataclass
class S3Bucket:
    name: str
    endpoint_url: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return storage_options_for(self.endpoint_url)

    def fs(self) -> Any:
        """A fresh ``s3fs.S3FileSystem`` on the server (not fsspec's cached instance)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket, sorted."""
        fs = self.fs()
        root = f"{self.name}/{prefix}".rstrip("/")
        if not fs.exists(root):
            return []
        return sorted(p[len(self.name) + 1 :] for p in fs.find(root))


class S3Server:
    """moto's S3 server in a child process on ``127.0.0.1``; a context manager."""

    _names = itertools.count()

    def __init__(self) -> None:
        env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION)
        # The server logs every request: to a file, never to a pipe nobody reads (a full pipe
        # blocks the server, and every client then waits forever).
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        line = self._first_line()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"moto server did not start: {line!r} {self.log_tail()}")
        self.port = int(line)
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def _first_line(self) -> str:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=START_TIMEOUT_S):
                return f"<no port within {START_TIMEOUT_S} s>"
        return self.proc.stdout.readline()

    def log_tail(self, n: int = 2000) -> str:
        """The end of the server's log (its stderr)."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-n:]

    def bucket(self, prefix: str = "jaxsave") -> S3Bucket:
        """A new, empty bucket on this server."""
        bucket = S3Bucket(f"{prefix}-{os.getpid()}-{next(self._names)}", self.endpoint_url)
        bucket.fs().mkdir(bucket.name)
        return bucket

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
