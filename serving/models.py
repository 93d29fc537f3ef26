"""Which versions of which models are served: TF Serving's version policies and labels, over
`<model base path>/<integer version>/` folders.

Each `ModelManager` watches one model's folder. "latest {N}" (the default, N=1) serves the
highest version that loads, and keeps older loaded ones up to N for pinned requests;
"specific" serves the listed versions; "all" every one on disk. A version that fails to load is
logged, reported END with its error and retried only when its files change; the version being
served stays in place. Requests read an immutable snapshot, so a swap never blocks or tears a
request. `ModelRegistry` holds the managers of every configured model and applies new
configurations (the config file re-read, or `HandleReloadConfigRequest`).
"""

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc

from components import storage
from components.artifacts.model_versions import list_versions
from serving.errors import RequestError, invalid_argument, not_found
from serving.signatures import DEFAULT_LIMITS, Limits, LoadedVersion

log = logging.getLogger(__name__)

LATEST, SPECIFIC, ALL = "latest", "specific", "all"


@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's model_version_policy."""

    kind: str = LATEST
    num_versions: int = 1  # latest
    versions: tuple[int, ...] = ()  # specific


@dataclass(frozen=True)
class ModelSpec:
    """One served model: TF Serving's ModelConfig (base_path holds the integer versions)."""

    name: str
    base_path: str
    policy: VersionPolicy = VersionPolicy()
    labels: tuple[tuple[str, int], ...] = ()  # version_labels, sorted by label


class VersionState(NamedTuple):
    """A version as GetModelStatus reports it (`state` is a ModelVersionStatus.State name)."""

    version: int
    state: str  # AVAILABLE, LOADING or END (failed to load)
    error: str = ""  # why it failed; empty otherwise


@dataclass(frozen=True)
class _Snapshot:
    """What requests see; replaced as a whole, never mutated."""

    loaded: dict[int, LoadedVersion] = field(default_factory=dict)
    latest: LoadedVersion | None = None


LoadListener = Callable[[str, int, bool], None]  # (model, version, loaded?) for metrics


class ModelManager:
    """One model: finds its versions, loads and warms up new ones before switching to them,
    never drops the version it serves for one that fails to load."""

    def __init__(
        self,
        spec: ModelSpec,
        limits: Limits = DEFAULT_LIMITS,
        warm_up: bool = True,
        on_load: LoadListener | None = None,
    ):
        if spec.policy.kind == LATEST and spec.policy.num_versions < 1:
            raise ValueError(f"latest needs num_versions >= 1, got {spec.policy.num_versions}")
        self.spec = spec
        self.limits = limits
        self.warm_up = warm_up
        self.on_load = on_load
        self._snapshot = _Snapshot()
        self._failed: dict[int, tuple[tuple, str]] = {}  # version -> (files fingerprint, error)
        self._loading: int | None = None
        self._poll_lock = threading.Lock()
        self._warned_empty = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def model_dir(self) -> str:
        return self.spec.base_path

    @property
    def latest(self) -> LoadedVersion | None:
        return self._snapshot.latest

    def reconfigure(self, spec: ModelSpec) -> None:
        """New policy or labels for the same folder; the next poll applies them."""
        self.spec = spec

    # --- what requests use ---

    def resolve(self, version: int | None = None, label: str = "") -> LoadedVersion:
        """The loaded version a request names; NOT_FOUND / INVALID_ARGUMENT / UNAVAILABLE with
        the reason otherwise."""
        snapshot = self._snapshot
        if label:
            labels = dict(self.spec.labels)
            if label not in labels:
                raise invalid_argument(
                    f"version label {label!r} is not configured for model {self.name!r} "
                    f"(configured labels: {', '.join(sorted(labels)) or 'none'})"
                )
            version = labels[label]
        if snapshot.latest is None:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"no version of model {self.name!r} is loaded yet (watching {self.model_dir})",
            )
        if version is None:
            return snapshot.latest
        found = snapshot.loaded.get(version)
        if found is None:
            raise not_found(
                f"version {version}{f' (label {label!r})' if label else ''} of model "
                f"{self.name!r} is not loaded "
                f"(loaded: {', '.join(map(str, sorted(snapshot.loaded)))})"
            )
        return found

    def states(self, version: int | None = None) -> list[VersionState]:
        """Loaded versions as AVAILABLE, one being loaded as LOADING, failed ones as END with
        their error; NOT_FOUND when there is nothing to report."""
        snapshot, loading = self._snapshot, self._loading
        states = {v: VersionState(v, "AVAILABLE") for v in snapshot.loaded}
        for v, (_, error) in list(self._failed.items()):
            states.setdefault(v, VersionState(v, "END", error))
        if loading is not None:
            states.setdefault(loading, VersionState(loading, "LOADING"))
        if version is not None:
            if version not in states:
                raise not_found(f"version {version} of model {self.name!r} is not loaded")
            return [states[version]]
        if not states:
            raise not_found(f"no version of model {self.name!r} found under {self.model_dir}")
        return [states[v] for v in sorted(states)]

    # --- loading ---

    def poll(self) -> bool:
        """One pass over the model folder; returns True when the served version set changed."""
        with self._poll_lock:
            return self._poll()

    def _poll(self) -> bool:
        on_disk = list_versions(self.model_dir)
        for version in [v for v in self._failed if v not in on_disk]:
            del self._failed[version]
        current = self._snapshot
        if not on_disk:
            if not self._warned_empty:
                what = (
                    f"still serving version {current.latest.version}"
                    if current.latest
                    else "waiting"
                )
                log.warning("no versions of %s under %s: %s", self.name, self.model_dir, what)
                self._warned_empty = True
            return False
        self._warned_empty = False
        policy = self.spec.policy
        if policy.kind == LATEST:
            loaded = self._select_latest(on_disk, current, policy.num_versions)
        else:
            wanted = on_disk if policy.kind == ALL else [v for v in on_disk if v in policy.versions]
            loaded = {}
            for version in wanted:
                got = current.loaded.get(version) or self._load(version)
                if got is not None:
                    loaded[version] = got
        if not loaded:
            return False
        target = loaded[max(loaded)]
        if loaded.keys() == current.loaded.keys() and target is current.latest:
            return False
        self._snapshot = _Snapshot(loaded, target)
        if target is not current.latest:
            previous = current.latest.version if current.latest else "none"
            log.info("serving %s version %d (was %s)", self.name, target.version, previous)
        dropped = sorted(set(current.loaded) - set(loaded))
        if dropped:
            log.info("unloaded %s versions %s", self.name, dropped)
        return True

    def _select_latest(self, on_disk: list[int], current: _Snapshot, keep: int) -> dict:
        target = None
        for version in reversed(on_disk):
            target = current.loaded.get(version) or self._load(version)
            if target is not None:
                break
        if target is None:
            return dict(current.loaded)
        older = sorted(
            (v for v in current.loaded if v < target.version and v in on_disk), reverse=True
        )[: keep - 1]
        return {target.version: target, **{v: current.loaded[v] for v in older}}

    def _load(self, version: int) -> LoadedVersion | None:
        """Load and warm up one version; None (logged, remembered) when it fails."""
        path = storage.join(self.model_dir, str(version))
        # A pushed version on an object store is immutable once its saved_model.pb exists.
        fingerprint = (path,) if storage.is_remote(path) else _fingerprint(path)
        failed = self._failed.get(version)
        if failed is not None and failed[0] == fingerprint:
            return None  # unchanged since it failed: do not retry every poll
        log.info("loading %s version %d from %s", self.name, version, path)
        self._loading = version
        try:
            # TensorFlow reads s3:// through no filesystem of its own: load a local copy
            # (variables and tables are in memory once loaded and warmed up).
            with (
                tempfile.TemporaryDirectory(prefix="mtrec-serve-") as workdir,
                storage.local_copy(path, workdir) as local,
            ):
                loaded = LoadedVersion(self.name, version, local, self.limits, warm_up=self.warm_up)
        except Exception as error:  # any load failure must leave the served version in place
            text = str(error).strip()
            message = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
            serving = self._snapshot.latest
            log.error(
                "could not load %s version %d (%s); %s",
                self.name,
                version,
                message,
                f"still serving version {serving.version}" if serving else "nothing is served yet",
            )
            self._failed[version] = (fingerprint, message)
            if self.on_load:
                self.on_load(self.name, version, False)
            return None
        finally:
            self._loading = None
        self._failed.pop(version, None)
        if self.on_load:
            self.on_load(self.name, version, True)
        log.info(
            "loaded %s version %d in %.1fs (signatures: %s%s)",
            self.name,
            version,
            loaded.load_seconds,
            ", ".join(sorted(loaded.signatures)),
            f"; {loaded.warmup_records} warmup requests replayed" if loaded.warmup_records else "",
        )
        return loaded


def _fingerprint(path: str) -> tuple:
    """Names, sizes and mtimes of a version's files: a failed version is retried when it changes."""
    entries = []
    for folder in (path, os.path.join(path, "variables")):
        try:
            with os.scandir(folder) as scan:
                for entry in scan:
                    if entry.is_file():
                        stat = entry.stat()
                        entries.append((entry.path, stat.st_size, stat.st_mtime_ns))
        except OSError:
            continue
    return tuple(sorted(entries))


class ModelRegistry:
    """Every configured model by name. `apply` swaps the configuration (models added, removed
    or re-policied) and loads what it needs before returning, as TF Serving's reload does."""

    def __init__(
        self,
        specs: Iterable[ModelSpec],
        limits: Limits = DEFAULT_LIMITS,
        warm_up: bool = True,
        on_load: LoadListener | None = None,
    ):
        self.limits = limits
        self.warm_up = warm_up
        self.on_load = on_load
        self._managers: dict[str, ModelManager] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._set(specs)

    def _set(self, specs: Iterable[ModelSpec]) -> None:
        managers = {}
        for spec in specs:
            existing = self._managers.get(spec.name)
            if existing is not None and existing.spec.base_path == spec.base_path:
                existing.reconfigure(spec)
                managers[spec.name] = existing
            else:
                managers[spec.name] = ModelManager(spec, self.limits, self.warm_up, self.on_load)
        removed = sorted(set(self._managers) - set(managers))
        if removed:
            log.info("models no longer configured, unloaded: %s", ", ".join(removed))
        self._managers = managers

    @property
    def managers(self) -> dict[str, ModelManager]:
        return self._managers

    @property
    def specs(self) -> list[ModelSpec]:
        return [m.spec for m in self._managers.values()]

    def manager(self, name: str) -> ModelManager:
        found = self._managers.get(name)
        if found is None:
            if not name:
                raise invalid_argument("model_spec.name is required")
            raise not_found(
                f"model {name!r} is not served here (this server serves "
                f"{', '.join(map(repr, sorted(self._managers))) or 'no model'})"
            )
        return found

    def resolve(self, name: str, version: int | None = None, label: str = "") -> LoadedVersion:
        return self.manager(name).resolve(version, label)

    def states(self, name: str, version: int | None = None) -> list[VersionState]:
        return self.manager(name).states(version)

    def ready(self) -> bool:
        """Every configured model has an AVAILABLE (hence warmed-up) version."""
        managers = self._managers
        return bool(managers) and all(m.latest is not None for m in managers.values())

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Called after each poll and each applied configuration (e.g. to flip health)."""
        self._listeners.append(listener)

    def poll(self) -> None:
        with self._lock:
            for manager in list(self._managers.values()):
                manager.poll()
        for listener in self._listeners:
            listener()

    def apply(self, specs: list[ModelSpec]) -> None:
        """A new configuration: models kept, added, re-policied or dropped; new versions
        loaded before this returns."""
        with self._lock:
            self._set(specs)
            for manager in list(self._managers.values()):
                manager.poll()
        for listener in self._listeners:
            listener()

    def watch(self, interval: float, stop: threading.Event) -> None:
        """Poll every `interval` seconds until `stop` is set (run in a thread)."""
        while not stop.wait(interval):
            try:
                self.poll()
            except Exception:  # a polling bug must not end polling
                log.exception("polling the model folders failed")
