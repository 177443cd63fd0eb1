"""The models a server holds: which versions are loaded, their states, and hot swaps.

Like TF Serving's file-system source and availability-preserving manager: every
``poll_seconds`` each model's base path is scanned for numeric version folders; the versions its
``model_version_policy`` wants are loaded (LOADING), warmed up with the version's
``assets.extra/tf_serving_warmup_requests`` and only then made AVAILABLE; versions the policy no
longer wants are unloaded after their replacement is AVAILABLE. Requests already running on an
old version finish on it: they hold a reference to it, and its batch queue drains before its
threads stop.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tensorflow_serving.apis import get_model_status_pb2

from serving.batching import Batcher
from serving.config import versions_to_serve
from serving.warmup import WARMUP, read_warmup

log = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


class ServingError(Exception):
    """An error with the gRPC status code the server answers with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def internal_error(what: str) -> str:
    """Log the exception being handled with its trace under a fresh id, and return the
    answer for the client: the id, never the exception's text (it can hold paths, tensors or
    data of other requests)."""
    import secrets

    incident = secrets.token_hex(6)
    logging.getLogger("serving").exception("%s failed (incident %s)", what, incident)
    return f"{what} failed: internal error, incident {incident} (the server's log has the trace)"


@dataclass
class VersionState:
    state: int
    error: str = ""
    error_code: int = 0  # tensorflow.error.Code


class Servable:
    """One loaded version of a model: its signatures, optionally behind batchers."""

    def __init__(self, name: str, version: int, path: Path, batching: dict | None) -> None:
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.name, self.version, self.path, self.batching = name, version, path, batching
        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString((path / "saved_model.pb").read_bytes())
        self.signature_defs = {
            key: sig
            for key, sig in saved.meta_graphs[0].signature_def.items()
            if not key.startswith("__")
        }
        self.loaded = tf.saved_model.load(str(path))
        self.functions = {key: self.loaded.signatures[key] for key in self.signature_defs}
        self.batchers: dict[str, Batcher] = {}
        self.lock = threading.Lock()
        self.closed = False

    def signature_def_map(self) -> Any:
        """The signatures as GetModelMetadata's ``signature_def`` metadata (a SignatureDefMap)."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, value in self.signature_defs.items():
            signatures.signature_def[key].CopyFrom(value)
        return signatures

    def call(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a signature (through its batcher when batching is on)."""
        batcher = self._batcher(signature)
        return batcher(inputs) if batcher else self._run(signature, inputs)

    def _run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        outputs = self.functions[signature](**{k: tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in outputs.items()}

    def _batcher(self, signature: str) -> Batcher | None:
        if not self.batching:
            return None
        with self.lock:
            if self.closed:  # unloaded while this request was on its way: run it directly
                return None
            if signature not in self.batchers:
                inputs = self.signature_defs[signature].inputs.values()
                batchable = all(
                    len(i.tensor_shape.dim) > 0 and i.tensor_shape.dim[0].size == -1 for i in inputs
                )
                if not batchable:
                    return None
                self.batchers[signature] = Batcher(
                    functools.partial(self._run, signature),
                    name=f"{self.name}-v{self.version}-{signature}",
                    **self.batching,
                )
            return self.batchers[signature]

    def warmup(self) -> int:
        """Replay the version's warmup requests (PredictLog records); any failure fails the
        load, as in TF Serving."""
        import tensorflow as tf

        path = self.path / WARMUP
        if not path.is_file():
            return 0
        count = 0
        for record in read_warmup(self.path):
            if record.WhichOneof("log_type") != "predict_log":
                raise ValueError(f"{path}: only predict_log warmup records are supported")
            request = record.predict_log.request
            signature = request.model_spec.signature_name or "serving_default"
            if signature not in self.functions:
                raise ValueError(f"{path}: warmup request names unknown signature {signature!r}")
            count += 1
            if count > MAX_WARMUP_RECORDS:
                raise ValueError(
                    f"{path}: more than {MAX_WARMUP_RECORDS} warmup records (TF Serving's limit)"
                )
            self._run(signature, {k: tf.make_ndarray(v) for k, v in request.inputs.items()})
        return count

    def close(self) -> None:
        with self.lock:
            self.closed = True
            batchers, self.batchers = list(self.batchers.values()), {}
        for batcher in batchers:
            batcher.close()


@dataclass
class Model:
    config: Any  # tensorflow.serving.ModelConfig
    base: Path
    versions: dict[int, Servable] = field(default_factory=dict)
    states: dict[int, VersionState] = field(default_factory=dict)


class ModelManager:
    def __init__(
        self,
        config: Any,
        *,
        mounts: dict[str, Path] | None = None,
        batching: dict | None = None,
        poll_seconds: float = 1.0,
    ) -> None:
        self.mounts = {k.rstrip("/"): Path(v) for k, v in (mounts or {}).items()}
        self.batching = batching
        self.lock = threading.RLock()
        self.sync_lock = threading.Lock()  # one scan at a time (poller and reload requests)
        self.models: dict[str, Model] = {}
        self.stopping = threading.Event()
        self.reload(config)
        self.thread = threading.Thread(
            target=self._poll_loop, args=(poll_seconds,), name="version-poller", daemon=True
        )
        if poll_seconds > 0:
            self.thread.start()

    # --- configuration and polling ---------------------------------------------------------

    def resolve_base(self, base_path: str) -> Path:
        """``base_path`` with a mounted prefix replaced, like ``docker run -v HOST:CONTAINER``."""
        for container, host in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if base_path == container or base_path.startswith(container + "/"):
                return host / base_path[len(container) :].lstrip("/")
        return Path(base_path)

    def reload(self, config: Any) -> None:
        """Serve exactly the models of ``config`` (a ModelServerConfig); returns after the
        versions its policies want have been loaded (or failed)."""
        wanted = {m.name: m for m in config.model_config_list.config}
        with self.lock:
            removed = [self.models.pop(n) for n in list(self.models) if n not in wanted]
            for name, model_config in wanted.items():
                base = self.resolve_base(model_config.base_path)
                if name in self.models:
                    self.models[name].config, self.models[name].base = model_config, base
                else:
                    self.models[name] = Model(model_config, base)
        for model in removed:
            for version in list(model.versions):
                self._unload(model, version)
        self.poll()

    def poll(self) -> None:
        with self.sync_lock:
            with self.lock:
                models = list(self.models.values())
            for model in models:
                self._sync(model)

    def _available(self, model: Model) -> list[int]:
        if not model.base.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in model.base.iterdir()
            if p.name.isdigit() and (p / "saved_model.pb").is_file()
        )

    def _sync(self, model: Model) -> None:
        name = model.config.name
        wanted = versions_to_serve(self._available(model), model.config.model_version_policy)
        for version in wanted:
            state = model.states.get(version)
            if state is None or (state.state == State.END and not state.error):
                self._load(model, version)
        # Availability first: the old versions go only once a wanted one serves (a broken new
        # version leaves the previous one serving), or when the policy wants none at all.
        if not wanted or any(v in model.versions for v in wanted):
            for version in list(model.versions):
                if version not in wanted:
                    self._unload(model, version)
        log.debug("%s: serving versions %s", name, sorted(model.versions))

    def _load(self, model: Model, version: int) -> None:
        name = model.config.name
        model.states[version] = VersionState(State.LOADING)
        started = time.perf_counter()
        try:
            servable = Servable(name, version, model.base / str(version), self.batching)
            warmups = servable.warmup()
        except Exception as exc:  # a broken version must not take the server down
            log.error("%s v%d failed to load: %s", name, version, exc)
            model.states[version] = VersionState(State.END, f"failed to load: {exc}", 13)
            return
        with self.lock:
            model.versions[version] = servable
            model.states[version] = VersionState(State.AVAILABLE)
        log.info(
            "%s v%d AVAILABLE after %.1f s (%d warmup requests)",
            name,
            version,
            time.perf_counter() - started,
            warmups,
        )

    def _unload(self, model: Model, version: int) -> None:
        with self.lock:
            servable = model.versions.pop(version, None)
            model.states[version] = VersionState(State.UNLOADING)
        if servable is not None:
            servable.close()  # queued requests finish first
        model.states[version] = VersionState(State.END)
        log.info("%s v%d unloaded", model.config.name, version)

    def _poll_loop(self, seconds: float) -> None:
        while not self.stopping.wait(seconds):
            try:
                self.poll()
            except Exception:  # keep polling; the next scan may succeed
                log.exception("version poll failed")

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            models = list(self.models.values())
        for model in models:
            for servable in list(model.versions.values()):
                servable.close()

    # --- lookups for requests ----------------------------------------------------------------

    def model(self, name: str) -> Model:
        with self.lock:
            model = self.models.get(name)
        if model is None:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({name}): no model named {name!r} "
                f"(serving {sorted(self.models)})",
            )
        return model

    def _requested_version(self, model: Model, spec: Any) -> int | None:
        """The version a ModelSpec names, by number or by label; None when it names none."""
        if spec.HasField("version"):
            return int(spec.version.value)
        if spec.version_label:
            labels = dict(model.config.version_labels)
            if spec.version_label not in labels:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Unrecognized servable version label: {spec.version_label!r} for "
                    f"model {spec.name!r} (labels: {sorted(labels)})",
                )
            return int(labels[spec.version_label])
        return None

    def servable(self, spec: Any) -> Servable:
        """The version a ModelSpec asks for: a number, a label, or the latest available."""
        model = self.model(spec.name)
        with self.lock:
            available = sorted(model.versions)
            version = self._requested_version(model, spec)
            if version is None:
                if not available:
                    raise ServingError(
                        grpc.StatusCode.NOT_FOUND,
                        f"Servable not found for request: Latest({spec.name}): no version of "
                        f"{spec.name!r} is AVAILABLE yet",
                    )
                version = available[-1]
            servable = model.versions.get(version)
        if servable is None:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Specific({spec.name}, {version}): "
                f"available versions are {available}",
            )
        return servable

    def version_states(self, spec: Any) -> list[tuple[int, VersionState]]:
        """GetModelStatus: every version of the model the manager knows, or only the one the
        ModelSpec names (NOT_FOUND when the manager never saw it)."""
        model = self.model(spec.name)
        version = self._requested_version(model, spec)
        states = list(self.states(spec.name))
        if version is None:
            return states
        states = [(v, s) for v, s in states if v == version]
        if not states:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Could not find version {version} of model {spec.name!r}",
            )
        return states

    def states(self, name: str) -> Iterator[tuple[int, VersionState]]:
        model = self.model(name)
        with self.lock:
            items = sorted(model.states.items())
        yield from items
