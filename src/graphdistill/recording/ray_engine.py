"""Recording on a Ray cluster: the tasks of :func:`~graphdistill.recording.batch.record_inputs` run in a
fixed pool of Ray actors, and the driver is the one writer of the trace store.

``record_inputs(inputs, store, engine="ray", actors=N, gpus_per_actor=G, batch_size=B, address=ADDR)``:

- the input rows are read as :func:`~graphdistill.recording.batch.read_inputs` reads them (a folder of
  images, a JSONL, a Parquet table) and become a Ray Dataset of (input, sample index) tasks, K samples
  per input, input by input;
- ``map_batches`` with a callable class (:class:`~graphdistill.recording.batch.RayActor`) on
  ``ActorPoolStrategy(size=N)``: each actor loads the graph once (``num_gpus=G`` each) and runs each
  batch of B tasks with :func:`~graphdistill.recording.batch.run_tasks`,
  the local code (TTA, sampling contract, failed traces for unreadable images, resume); its recorder
  builds each trace as it does locally and puts it in a :class:`~graphdistill.store.buffer.TraceBuffer`;
  the batch returns the traces (JSON) and their blobs;
- the driver appends each through ``TraceStore.append``, whose unique key (input hash, sample index, graph
  hash) refuses a second copy: a batch Ray retries after its actor died is recorded exactly once.

Why the driver writes (not per-actor shards and a merge): ``docs/design.md`` ("Recording on Ray"), with the
figures of ``benchmarks/ray_record.py``. Ray is imported lazily (``graphdistill[ray]``), never reports usage,
starts no dashboard, and a cluster this function started is shut down before it returns.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from graphdistill._lazy import require
from graphdistill.errors import GraphdistillError
from graphdistill.store.buffer import InputKey
from graphdistill.store.trace_store import DuplicateTraceError, StoreError, TraceStore
from graphdistill.trace import Trace

log = logging.getLogger(__name__)

# Ray must never call home, nor serve a dashboard; the teachers stay offline in the workers too
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "ANONYMIZED_TELEMETRY": "False",
}


class ClusterError(GraphdistillError, RuntimeError):
    """The Ray cluster cannot be reached, or a job on it failed; the message names the address or the
    error the actors raised."""


# Ray's switch for a single-machine cluster (its default on macOS and Windows): every server binds the
# loopback and the node's address is 127.0.0.1. Ray reads it when it is imported.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _ray(*, loopback: bool = False) -> Any:
    """The ray module, imported with :data:`RAY_ENV` (and :data:`LOOPBACK_ENV` with ``loopback``: a cluster
    on this machine only) set unless the user set them; raises for ``loopback`` when ray was imported
    without it, since Ray would then listen on every interface."""
    env = {**RAY_ENV, **(LOOPBACK_ENV if loopback else {})}
    fresh = "ray" not in sys.modules
    for k, v in env.items():
        os.environ.setdefault(k, v)
    ray = require("ray", "ray", purpose="recording on a Ray cluster")
    if loopback and not fresh and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise ClusterError(
            "ray was imported before graphdistill could keep it on the loopback: import it after "
            "graphdistill.recording.ray_engine.connect(), or give the address of a running cluster"
        )
    return ray


def _is_loopback(address: str | None) -> bool:
    """No address (a cluster started here) or one on this machine's loopback."""
    if address is None:
        return True
    host = address.split("://", 1)[-1].rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def worker_env() -> dict[str, str]:
    """The environment every Ray worker gets (``runtime_env["env_vars"]``): the offline switches, and the
    driver's ``PYTHONPATH`` with the folder this graphdistill was imported from first, so the actors import
    the same graphdistill as the driver."""
    src = str(Path(__file__).resolve().parents[2])
    path = [src, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != src)]
    return {**RAY_ENV, "PYTHONPATH": os.pathsep.join(path)}


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """``ray.init`` as graphdistill always calls it: join ``address`` or start a local cluster whose
    servers listen on the loopback only (``num_cpus``: its size; None: every core), no dashboard, no usage
    report, every worker with :func:`worker_env`. The caller shuts it down (``ray.shutdown()``)."""
    ray = _ray(loopback=_is_loopback(address))
    if address is not None:
        _check_reachable(address)
    ray.init(
        address=address,
        include_dashboard=False,
        runtime_env={"env_vars": worker_env()},
        logging_level=logging.WARNING,
        **({} if address else {"num_cpus": num_cpus}),
    )


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse an ``--address`` nothing answers at, at once and in one line (``ray.init`` would retry for
    a minute). ``auto`` and ``local`` are Ray's own words and pass."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"ray address {address!r}: expected HOST:PORT (e.g. 127.0.0.1:6379) or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(f"ray address {address}: unreachable ({exc.strerror or exc})") from None


def traces_table(taken: Sequence[tuple[Trace, dict[str, bytes]]], skipped: int, lost: int) -> Any:
    """What an actor returns for one batch: a row per trace it made (``trace``: its JSON, ``blob_names`` /
    ``blob_data``: its blobs) and one row of counts (``skipped``: runs resume left out; ``lost``: runs
    whose trace could not be built, logged on the actor). :func:`_write` reads it on the driver."""
    import pyarrow as pa

    names = [list(blobs) for _, blobs in taken]
    return pa.table(
        {
            "trace": [t.to_json() for t, _ in taken] + [None],
            "blob_names": [*names, []],
            "blob_data": [[blobs[n] for n in ns] for (_, blobs), ns in zip(taken, names, strict=True)] + [[]],
            "skipped": [0] * len(taken) + [skipped],
            "lost": [0] * len(taken) + [lost],
        },
        schema=pa.schema(
            [
                ("trace", pa.large_string()),
                ("blob_names", pa.list_(pa.string())),
                ("blob_data", pa.list_(pa.large_binary())),
                ("skipped", pa.int64()),
                ("lost", pa.int64()),
            ]
        ),
    )


def record_on_ray(
    tasks: Sequence[dict[str, Any]],
    store: str,
    *,
    actor: type,
    actor_kwargs: Callable[[set[InputKey]], dict[str, Any]],
    resume: bool,
    actors: int,
    gpus_per_actor: float,
    batch_size: int,
    address: str | None,
    on_start: Callable[[int], None] | None,
    done: Callable[[dict[str, int], int], None],
    cpus_per_actor: float = 1.0,
) -> None:
    """Run the (input row, sample index) ``tasks`` of :func:`~graphdistill.recording.batch.record_inputs`
    (``engine="ray"``, which checks the arguments) on a pool of ``actors`` Ray actors of class ``actor``
    (built with ``actor_kwargs(keys)``, ``keys`` the store's :meth:`~TraceStore.input_keys` with ``resume``,
    else empty; called on a pyarrow table with a ``task`` column of JSON, returning :func:`traces_table`),
    and append every trace they return to the store at ``store``; ``done(counts, n)`` after each output
    block of ``n`` runs.

    A Ray already initialised in this process (``ray.init`` by the caller) is used as it is and left
    running; otherwise this joins ``address`` (or starts a local cluster on the loopback) and shuts it down
    before it returns."""
    if address is not None:
        _check_reachable(address)
    # imported already: maybe initialised by the caller (then used as it is); else as connect() needs it
    ray = sys.modules.get("ray") or _ray(loopback=_is_loopback(address))
    db = TraceStore(store)
    started = not ray.is_initialized()
    try:
        if started:
            connect(address)
        elif address is not None:
            log.warning("ray is already initialised in this process: its cluster is used, not %s", address)
        _check_fits(ray.cluster_resources(), actors, cpus_per_actor, gpus_per_actor)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the CLI shows its own
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines, not ours
        # its warning that the bars are off: they are, on purpose (the CLI shows its own)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks]).map_batches(
            actor,  # Ray Data ships these arguments (the resume keys) to each actor through its object store
            fn_constructor_kwargs=actor_kwargs(db.input_keys() if resume else set()),
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=cpus_per_actor,
            **({"num_gpus": gpus_per_actor} if gpus_per_actor else {}),
        )
        if on_start is not None:
            on_start(len(tasks))
        for table in _batches(ray, ds):
            done(*_write(db, table))
    finally:
        db.close()
        if started:
            ray.shutdown()


def _check_fits(resources: dict[str, float], actors: int, cpus: float, gpus: float) -> None:
    """Refuse a pool the cluster cannot hold (Ray would wait for it forever): N actors × what each reserves
    against the cluster's totals now (a cluster that autoscales is judged by what it has when asked)."""
    for what, each, flag in (("CPU", cpus, "cpus per actor"), ("GPU", gpus, "--gpus-per-actor")):
        have = float(resources.get(what, 0.0))
        if each and actors * each > have:
            raise ClusterError(
                f"--actors {actors} × {flag} {each:g} needs {actors * each:g} {what}s; the cluster has {have:g}"
            )


def _batches(ray: Any, ds: Any) -> Any:
    """The actors' output tables as they finish; a failure on the cluster (the graph does not load, an
    actor's code raised) becomes one RecordingError line."""
    it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    while True:
        try:
            table = next(it)
        except StopIteration:
            return
        except ray.exceptions.RayError as exc:
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            lines = [ln for ln in str(cause).strip().splitlines() if ln.strip()]
            raise ClusterError(
                f"recording on ray failed: {lines[-1] if lines else type(exc).__name__}"
            ) from exc
        yield table


def _write(db: TraceStore, table: Any) -> tuple[dict[str, int], int]:
    """Append the traces of one output table to the store; returns the counts and how many runs it holds."""
    counts = {"recorded": 0, "failed": 0, "skipped": 0}
    done = 0
    cols = table.to_pydict()
    for text, names, data, skipped, lost in zip(
        cols["trace"], cols["blob_names"], cols["blob_data"], cols["skipped"], cols["lost"], strict=True
    ):
        counts["skipped"] += skipped
        counts["failed"] += lost
        done += skipped + lost
        if text is None:
            continue
        done += 1
        trace = Trace.from_json(text)
        try:
            db.append(trace, dict(zip(names, data, strict=True)))
        except DuplicateTraceError:  # stored by an earlier run, or by an earlier try of a retried batch
            counts["skipped"] += 1
            continue
        except StoreError as exc:  # as the local recorder: counted and logged, the job goes on
            log.error("trace NOT recorded in %s: %s", db.root, exc)
            counts["failed"] += 1
            continue
        counts["recorded" if trace.status == "ok" else "failed"] += 1
    return counts, done
