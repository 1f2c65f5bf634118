"""Where independent tasks run: in this process one after the other (`LocalBackend`), or as Ray tasks on a cluster
(`RayBackend`, the optional extra `moepack[ray]`). Calibration shards and sensitivity probes go through this.

    backend = make_backend(None | "auto" | "HOST:6379" | "ray://HOST:10001")
    results = backend.map(fn, items, shared_a, shared_b, num_cpus=threads, desc="probes")  # fn(item, a, b), in order

Contract of a task function `fn(item, *shared)`: a module-level function (workers import it by name) that takes
plain data (numpy arrays, dicts, dataclasses of those; a `ViewRef` instead of a checkpoint view: `open_view`
re-opens the checkpoint from its path, which must be on storage every worker sees) and sets torch's thread count
itself (`torch_threads`): full reductions such as `x.sum()` round differently with 1 and 2 threads, so the thread
count is part of a task's input, and the same task gives bitwise the same result in-process and on a Ray worker
(same CPU kind and library versions). The `shared` arguments are sent once (Ray's object store: numpy arrays in
them are read zero-copy, read-only, by every task on a node); items are sent with their task.

Ray resources: each task asks for `num_cpus` = the thread count it sets, and `memory` = the caller's estimate of
its peak, so Ray never runs more tasks on a node than its cores and memory hold (it queues the rest).
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from moepack.errors import MoepackError

if TYPE_CHECKING:  # the model is imported where a task opens it: building the CLI's parser stays light
    from moepack.model.checkpoint import CheckpointView
    from moepack.schema import PrunePlan

__all__ = [
    "DistributedError",
    "Backend",
    "LocalBackend",
    "RayBackend",
    "make_backend",
    "ViewRef",
    "open_view",
    "torch_threads",
    "as_tensor",
    "partition",
    "layer_f32_bytes",
    "running_cluster",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # a Ray address that does not answer within this fails at once instead of hanging
_RAY_HINT = "install the Ray extra: pip install 'moepack[ray]' (or pip install 'ray>=2.40')"


class DistributedError(MoepackError, ValueError):
    """The backend cannot run as asked; the message says what to change."""


# ---------------------------------------------------------------------------------------------------- task helpers

class torch_threads:
    """torch's intra-op thread count set for a block (results depend on it), then restored."""

    def __init__(self, n: int) -> None:
        import torch

        self.n, self.prev = max(1, int(n)), torch.get_num_threads()

    def __enter__(self) -> None:
        import torch

        torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.set_num_threads(self.prev)


def as_tensor(a: Any):  # -> torch.Tensor
    """A torch view of a numpy array that may be read-only (Ray's object store); callers never write to it."""
    import torch

    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(np.asarray(a))


@dataclass(frozen=True)
class ViewRef:
    """A checkpoint view as plain data: its directory (on storage every worker sees), the prune plan and k' of a
    lazily pruned view, and the fingerprint the worker's view must have (a different checkpoint at that path fails)."""

    root: str
    fingerprint: str
    plan: PrunePlan | None = None  # PrunedView: the plan it was pruned by
    top_k: int | None = None  # PrunedView: its k' (which may differ from the plan's)

    @classmethod
    def of(cls, view: CheckpointView) -> ViewRef:
        from moepack.model.checkpoint import CheckpointView
        from moepack.model.pruned import PrunedView

        if isinstance(view, PrunedView) and view.source is not None and view.plan is not None:
            return cls(str(Path(view.source.root).resolve()), view.fingerprint(), view.plan, view.facts.top_k)
        if type(view) is not CheckpointView:
            raise DistributedError(f"a {type(view).__name__} cannot be sent to Ray workers; open the checkpoint "
                                   "with open_checkpoint (or prune it to disk) first")
        return cls(str(Path(view.root).resolve()), view.fingerprint())


def open_view(view: CheckpointView | ViewRef) -> CheckpointView:
    """A task's view: the view itself in-process; a `ViewRef` re-opened from storage (headers only)."""
    if not isinstance(view, ViewRef):
        return view
    from moepack.model.checkpoint import open_checkpoint
    from moepack.model.pruned import pruned_view

    got = open_checkpoint(view.root)
    if view.plan is not None:
        got = pruned_view(got, view.plan, view.top_k)
    if got.fingerprint() != view.fingerprint:
        raise DistributedError(f"{view.root} on worker {socket.gethostname()} is not the checkpoint the driver "
                               "opened (config or tensor table differ); every machine must see the same files "
                               "at the same path")
    return got


def partition(costs: Sequence[float], n: int) -> list[list[int]]:
    """Indices 0..len(costs)-1 in at most `n` non-empty bins of about equal total cost (largest first onto the
    lightest bin; deterministic), each bin in index order."""
    n = max(1, min(n, len(costs)))
    bins: list[list[int]] = [[] for _ in range(n)]
    load = [0.0] * n
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        j = min(range(n), key=lambda j: (load[j], j))
        bins[j].append(i)
        load[j] += costs[i]
    return [sorted(b) for b in bins if b]


def layer_f32_bytes(view: CheckpointView) -> int:
    """Float32 bytes of the largest decoder layer (what one materialised layer costs in memory)."""
    per: dict[int, int] = {}
    for t in view.tensors.values():
        if t.layer is not None:
            per[t.layer] = per.get(t.layer, 0) + 4 * t.numel
    return max(per.values(), default=0)


# ---------------------------------------------------------------------------------------------------- backends

class Backend(ABC):
    """Runs `fn(item, *shared)` for every item and returns the results in item order."""

    name = "backend"
    local = True

    def slots(self, num_cpus: int) -> int:
        """How many tasks of `num_cpus` threads run at once."""
        return 1

    def default_threads(self, local: int) -> int:
        """Threads per task when the user gives none: `local` in-process; on Ray the cores of the smallest node,
        so that one task fills a machine (and reads the checkpoint once per machine)."""
        return local

    def view_arg(self, view: CheckpointView) -> CheckpointView | ViewRef:
        """What a task receives for `view` (see `open_view`)."""
        return view

    @abstractmethod
    def map(self, fn: Callable[..., Any], items: Sequence[Any], *shared: Any, desc: str = "tasks",
            num_cpus: int = 1, memory: int | None = None, progress: bool = True) -> list[Any]:
        """`fn(item, *shared)` for every item, results in item order; `num_cpus`/`memory` per task."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalBackend(Backend):
    """Every task in this process, one after the other (each sets its own thread count)."""

    name = "local"

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *shared: Any, desc: str = "tasks",
            num_cpus: int = 1, memory: int | None = None, progress: bool = True) -> list[Any]:
        from tqdm.auto import tqdm

        return [fn(item, *shared) for item in tqdm(items, desc=desc, unit="task",
                                                   disable=not progress or len(items) < 2)]


class RayBackend(Backend):
    """Tasks on a Ray cluster: "auto" (a running cluster, else a new one on this machine), HOST:PORT of a head's
    GCS (`ray start --head --port=6379`), or ray://HOST:10001 (Ray Client). Reuses a connection this process has."""

    name = "ray"
    local = False

    def __init__(self, address: str = "auto", *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        try:
            import ray
        except ImportError:
            raise DistributedError(f"--ray needs Ray, which is not installed; {_RAY_HINT}") from None
        self._ray = ray
        self._owned = False
        if ray.is_initialized():
            log.info("Ray: using this process's connection (%s CPUs)", self.cpus)
        elif address == "auto":
            self._connect_auto(timeout_s)
        else:
            _check_reachable(address, timeout_s)
            self._connect(address)
            log.info("Ray: connected to %s (%s CPUs on %d node(s))", address, self.cpus, len(self._nodes()))

    def _init(self, **kw: Any) -> None:
        self._ray.init(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING, **kw)
        self._owned = True

    def _connect_auto(self, timeout_s: float) -> None:
        found, source = running_cluster()
        if found:
            try:
                _check_reachable(found, timeout_s)
            except DistributedError:
                if source == "RAY_ADDRESS":
                    raise
                log.warning("Ray: the cluster %s named by %s does not answer (stopped?)", found, source)
                found = None
        if not found:  # address="local": a new cluster, never the stale one ray.init("auto") would wait for
            self._init(address="local")
            log.info("Ray: no running cluster found; started a local one on this machine (%s CPUs)", self.cpus)
            return
        self._connect("auto", found)  # as ray.init finds it: it then also takes that cluster's auth settings
        log.info("Ray: connected to the running cluster at %s (%s CPUs on %d node(s))", found, self.cpus,
                 len(self._nodes()))

    def _connect(self, address: str, shown: str | None = None) -> None:
        try:
            self._init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"--ray {shown or address}: Ray did not accept the connection ({last[:300]}). A cluster started with "
                "`ray start` uses token authentication: set RAY_AUTH_MODE=token here and give this machine the "
                "head's token (~/.ray/auth_token, see `ray get-auth-token`); ray:// addresses need "
                "pip install 'ray[client]'") from None

    def _nodes(self) -> list[dict[str, float]]:
        return [n["Resources"] for n in self._ray.nodes() if n.get("Alive")]

    @property
    def cpus(self) -> int:
        return int(self._ray.cluster_resources().get("CPU", 0))

    def slots(self, num_cpus: int) -> int:
        return max(1, sum(int(r.get("CPU", 0)) // max(1, num_cpus) for r in self._nodes()))

    def default_threads(self, local: int) -> int:
        return max(1, min((int(r.get("CPU", 0)) for r in self._nodes() if r.get("CPU", 0) >= 1), default=1))

    def view_arg(self, view: CheckpointView) -> CheckpointView | ViewRef:
        return ViewRef.of(view)

    def _check_fits(self, num_cpus: int, memory: int | None) -> None:
        nodes = self._nodes()
        if not any(r.get("CPU", 0) >= num_cpus for r in nodes):
            most = max((int(r.get("CPU", 0)) for r in nodes), default=0)
            raise DistributedError(f"each task asks for {num_cpus} CPUs (--threads) but the largest Ray node has "
                                   f"{most}; lower --threads")
        if memory and not any(r.get("CPU", 0) >= num_cpus and r.get("memory", 0) >= memory for r in nodes):
            most = max((r.get("memory", 0) for r in nodes), default=0)
            raise DistributedError(f"each task needs about {memory / 2**30:.1f} GiB but the largest Ray node offers "
                                   f"{most / 2**30:.1f} GiB; add memory, or use fewer sequences per task "
                                   "(more --shards) or a smaller --batch-size")

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *shared: Any, desc: str = "tasks",
            num_cpus: int = 1, memory: int | None = None, progress: bool = True) -> list[Any]:
        from tqdm.auto import tqdm

        ray = self._ray
        if not items:
            return []
        self._check_fits(num_cpus, memory)
        opts: dict[str, Any] = {"num_cpus": num_cpus}
        if memory:
            opts["memory"] = int(memory)
        remote = ray.remote(fn).options(**opts)
        refs_shared = [ray.put(s) for s in shared]  # once; top-level ObjectRef arguments arrive resolved
        refs = [remote.remote(item, *refs_shared) for item in items]
        index = {r: i for i, r in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        try:
            with tqdm(total=len(refs), desc=f"{desc} (ray)", unit="task", disable=not progress) as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    results[index[done[0]]] = ray.get(done[0])  # a task's error is raised at once
                    bar.update(1)
            return results
        except BaseException as e:
            for r in pending:
                ray.cancel(r)
            cause = getattr(e, "cause", None)
            if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, MoepackError):
                raise cause from None  # the one-line message the CLI prints, not the remote traceback
            raise

    def close(self) -> None:
        if self._owned:
            self._ray.shutdown()
            self._owned = False


def running_cluster() -> tuple[str | None, str]:
    """(address, where it came from) of the cluster `ray.init(address="auto")` would join: RAY_ADDRESS, else the
    address the last `ray start` on this machine left in Ray's temp dir."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env not in ("auto", "local"):
        return env, "RAY_ADDRESS"
    if env == "local":
        return None, "RAY_ADDRESS"
    path = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "ray_current_cluster"
    try:
        return path.read_text().strip() or None, str(path)
    except OSError:
        return None, str(path)


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail at once, with what to do, when nothing listens at a Ray address (ray.init would wait a long time)."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"--ray {address!r}: expected auto, HOST:PORT (the head's GCS port, 6379 by "
                               "default) or ray://HOST:PORT (Ray Client, 10001)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise DistributedError(f"--ray {address}: nothing answers there ({e.strerror or e}); start the head "
                               "with `ray start --head --port=6379`, or use --ray auto") from None


def make_backend(ray: str | None) -> Backend:
    """None → `LocalBackend`; "auto" or an address → `RayBackend`."""
    if ray is None:
        return LocalBackend()
    if not str(ray).strip():
        raise DistributedError("--ray needs auto or an address such as HEAD:6379")
    return RayBackend(str(ray).strip())
