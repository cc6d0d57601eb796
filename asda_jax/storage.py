"""Where a run's files live: a local folder or a Cloud Storage URL (``gs://``).

Every path a user names (``workdir``, ``data_dir``, ``init_from``, exports, the tools'
``--checkpoint``, ``--audio`` and ``--output``) becomes an ``etils.epath.Path`` here,
the path type Orbax, TFDS and clu already take, so a bucket behaves as a folder does.

epath serves ``gs://`` through TensorFlow's gfile whenever TensorFlow is installed (it
is, for clu's TensorBoard writer), and TF's GCS client cannot be pointed at another
endpoint: a bucket would then be reachable in production and in no test. ``configure``
makes epath use fsspec's gcsfs instead, which honours ``STORAGE_EMULATOR_HOST``, unless
the user set ``EPATH_USE_TF`` themselves. The launchers call it first (``cli.start``);
importing the library changes no other library's settings, so a program that uses
asda_jax beside its own epath code keeps epath's choice unless it calls ``configure``
too. Orbax's
array writes go through tensorstore, which has its own client (pointed elsewhere with
``TENSORSTORE_GCS_HTTP_URL``), and array_record's reader through google-cloud-cpp
(``CLOUD_STORAGE_EMULATOR_ENDPOINT``). gcsfs's listings are not cached: other hosts
and tensorstore write objects behind its back, and a stale listing would hide a
checkpoint from a resuming run.

An object store cannot append to an object or rename one, so files that grow while a
run writes them (``metrics.jsonl``, TensorBoard events, a profile, an extraction's
outputs) are written into a local folder and copied whole to the remote one at each
``Stage.sync`` (as TF's own GCS writer re-uploads a whole file at each flush).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import fsspec
from etils import epath

# s3:// would need s3fs and an S3 server to test against; it is not offered.
REMOTE_SCHEMES = ("gs://",)


def configure() -> None:
    """Serves ``gs://`` paths through gcsfs with uncached listings (see the module
    docstring); settings the user made first are kept. Call it before the process's
    first epath operation on any path, local ones included: epath reads
    ``EPATH_USE_TF`` once, then keeps its choice. Changes this process's environment,
    which the processes it starts inherit."""
    os.environ.setdefault("EPATH_USE_TF", "false")
    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_remote(name: str | os.PathLike) -> bool:
    return os.fspath(name).startswith(REMOTE_SCHEMES)


def path(name: str | os.PathLike) -> epath.Path:
    """``name`` as an epath.Path: a URL as given, a local path made absolute (Orbax
    requires absolute paths; a relative one would also change meaning with the cwd)."""
    if isinstance(name, str) and ":/" in name and not is_remote(name):
        raise ValueError(
            f"{name}: unsupported URL; use a local path or one of {', '.join(REMOTE_SCHEMES)}"
        )
    found = epath.Path(name)
    return found if is_remote(found) else epath.Path(os.path.abspath(found))


class MissingBucket(FileNotFoundError):
    """A ``gs://`` path whose bucket does not exist or cannot be seen with these
    credentials."""


def require_bucket(name: epath.Path) -> None:
    """Raises MissingBucket unless the bucket of a ``gs://`` path is there."""
    bucket = epath.Path("gs://" + os.fspath(name).removeprefix("gs://").split("/")[0])
    if not bucket.exists():
        raise MissingBucket(
            f"{name}: bucket {bucket} does not exist or these credentials cannot see it "
            f"(create it with: gcloud storage buckets create {bucket})"
        )


def make_folder(folder: epath.Path) -> None:
    """Creates a local folder. A bucket has no folders, so for a ``gs://`` one this
    checks that its bucket is there, before a run spends anything on it."""
    if is_remote(folder):
        require_bucket(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)


def make_new_folder(folder: epath.Path) -> None:
    """``make_folder`` for something written once (an export): a folder that already
    holds files is refused, never written into."""
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; choose a new directory")
    make_folder(folder)


def files_under(root: epath.Path) -> list[str]:
    """The files under ``root`` (local or remote), as sorted names relative to it."""
    found = []
    for item in root.iterdir():
        if item.is_dir():
            found += [f"{item.name}/{name}" for name in files_under(item)]
        else:
            found.append(item.name)
    return sorted(found)


def copy_file(source: epath.Path, target: epath.Path) -> None:
    """One file to ``target`` (either may be remote), its folders made as needed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source.copy(target, overwrite=True)


def copy_tree(source: epath.Path, target: epath.Path, last: tuple[str, ...] = ()) -> list[str]:
    """Copies every file under ``source`` to the same relative place under ``target``
    (either may be remote), the files named ``last`` (by base name) after all others,
    so that a copy cut short never holds them; returns the relative names copied."""
    names = sorted(files_under(source), key=lambda name: name.rsplit("/", 1)[-1] in last)
    for name in names:
        copy_file(source / name, target / name)
    return names


class Stage:
    """A local folder standing in for ``target``: written locally, copied to ``target``
    by ``sync`` (the files whose size or time changed since the last sync). For a
    local target the stage is the target itself and ``sync`` does nothing.

    ``pull`` names files of ``target`` to copy into the stage first, so a resumed run
    appends to what the earlier one wrote rather than replacing it."""

    def __init__(self, target: str | os.PathLike, pull: tuple[str, ...] = ()):
        self.target = path(target)
        self.remote = is_remote(self.target)
        make_folder(self.target)
        if not self.remote:
            self.local = self.target
            return
        self.local = epath.Path(tempfile.mkdtemp(prefix="asda-jax-stage-"))
        self._synced: dict[str, tuple[int, int]] = {}
        for name in pull:
            if (self.target / name).is_file():
                copy_file(self.target / name, self.local / name)
                self._synced[name] = self._signature(self.local / name)

    @staticmethod
    def _signature(item: epath.Path) -> tuple[int, int]:
        stat = os.stat(item)
        return stat.st_size, stat.st_mtime_ns

    def sync(self) -> None:
        if not self.remote:
            return
        for name in files_under(self.local):
            item = self.local / name
            if self._synced.get(name) != self._signature(item):
                copy_file(item, self.target / name)
                self._synced[name] = self._signature(item)

    def close(self) -> None:
        """Copies what is left, then removes the local stand-in of a remote target."""
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
