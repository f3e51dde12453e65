"""Rankers a job names, in a form every worker of the cluster can load.

A segment job's ranker (``--clip``) is one of:

* a spec each worker resolves by itself: a hub id in its weights cache, a name (``synth``, ``tiny-random``: a name
  wins over a local folder of the same name, as when loading), a path that exists on the workers;
* ``store:rankers/<digest>`` — a ranker directory in the object store, content-addressed by the digest of its
  file manifest (:func:`jobs.training.directory_manifest`: every file's path, SHA-256 and size), which is
  written last as ``rankers/<digest>.json`` (present = the directory is complete). The producer uploads a local
  directory given as ``--clip DIR`` (a ranker fine-tuned by ``slip review`` or ``slip train-ranker``) once; a
  worker reads it in place from a directory store, or fetches it once into ``$SLIP_CACHE/rankers/`` from any
  other store;
* ``job:<train job>`` — the best cell of a ranker trained through the queue (``slip submit train``): replaced by
  that cell's ``store:`` checkpoint when the job is submitted, so the manifest names what really ran.

The results' keys come from the SHA-256 of the weights the worker really loaded (:class:`slip.request.ModelRef`),
the same whether the ranker was read from the producer's folder or from the store.
"""

from __future__ import annotations

from pathlib import Path

from jobs.errors import ObjectNotFoundError
from jobs.keys import validate_key
from jobs.store import Store
from jobs.training import STORE_SPEC
from slip import names
from slip.errors import InputError, WeightsNotFoundError

JOB_SPEC = "job:"  # a ranker trained through the queue: job:<train job id>
RANKERS = "rankers"  # store prefix of uploaded ranker directories


def publish_ranker(store: Store, spec: str) -> str:
    """The spec workers load for ``spec`` (producer side): a local directory is uploaded (once) and named
    ``store:rankers/<digest>``; ``job:<id>`` becomes its best cell's checkpoint; a ``store:`` spec must exist;
    anything else passes through. One-line InputError / WeightsNotFoundError otherwise."""
    from jobs.training import directory_manifest
    from slip.request import digest
    from slip.weights import DIGEST_SUFFIX, OPEN_CLIP_CONFIG, holds_ranker

    if spec.startswith(JOB_SPEC):
        return trained_ranker(store, spec[len(JOB_SPEC):])
    if spec.startswith(STORE_SPEC):
        store_prefix(store, spec)
        return spec
    path = Path(spec).expanduser()
    if spec in names.RANKER_NAMES or not path.is_dir():  # a name wins over a folder called so, as when loading
        return spec
    if not holds_ranker(path):
        raise InputError(f"--clip {spec}: the folder {path} holds no ranker (expected config.json: a Hugging Face "
                         f"CLIP / SigLIP or a ranker saved by `slip train-ranker` / `slip review`; or "
                         f"{OPEN_CLIP_CONFIG}); nothing submitted")
    manifest = directory_manifest(path)  # the weights' digest records (a cache written beside them) left out:
    manifest["files"] = [f for f in manifest["files"] if not f["path"].endswith(DIGEST_SUFFIX)]
    prefix = f"{RANKERS}/{digest(manifest)}"
    if not store.exists(f"{prefix}.json"):
        for entry in manifest["files"]:
            store.put_bytes(f"{prefix}/{entry['path']}", (path / entry["path"]).read_bytes())
        store.put_json(f"{prefix}.json", manifest)  # last: the directory is complete
    return f"{STORE_SPEC}{prefix}"


def trained_ranker(store: Store, job_id: str) -> str:
    """``store:<prefix>`` of the best finished cell (lowest validation loss) of the train job ``job_id``."""
    from jobs.ledger import load_manifest
    from jobs.training import cell_prefix

    manifest = load_manifest(store, job_id)
    if manifest.kind != "train":
        raise InputError(f"job:{job_id} names a {manifest.kind} job: a ranker comes from a train job (slip submit "
                         f"train)")
    rows = []
    for cell in range(manifest.total):
        try:
            rows.append(store.get_json(f"{cell_prefix(job_id, cell)}/result.json"))
        except ObjectNotFoundError:
            continue
    finished = [r for r in rows if r.get("best_val_loss") is not None and r.get("checkpoint")]
    if not finished:
        raise InputError(f"training job {job_id} has no finished cell yet: wait for it (slip wait {job_id})")
    return min(finished, key=lambda r: r["best_val_loss"])["checkpoint"]


def store_prefix(store: Store, spec: str) -> str:
    """The store prefix of a ``store:`` spec; WeightsNotFoundError when nothing is stored under it."""
    prefix = validate_key(spec[len(STORE_SPEC):].strip("/"))
    if not (store.exists(f"{prefix}.json") if prefix.startswith(f"{RANKERS}/") else store.list(prefix)):
        raise WeightsNotFoundError(f"ranker {spec} is not in the store {store.url} (nothing under {prefix}/): submit "
                                   f"the job again with --clip DIR, which uploads the ranker directory")
    return prefix


def local_ranker(store: Store, spec: str, cache_root: Path) -> str:
    """A spec this worker can load (worker side): ``store:`` specs become a local directory (the store's own
    folder for a directory store, a copy fetched once into ``cache_root/rankers`` otherwise)."""
    from jobs.training import ranker_directory

    if spec.startswith(STORE_SPEC):
        store_prefix(store, spec)
    return ranker_directory(store, spec, cache_root)
