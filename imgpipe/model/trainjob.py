"""TF_CONFIG for a pod of a Kubeflow Trainer ``TrainJob``, from what JobSet tells the pod.

Trainer v2 has no TensorFlow policy (torch, MPI, JAX... and plain): under the plain policy the
``imgpipe-tensorflow`` runtime (``infra/k8s/trainer``) runs one replicated job, ``node``, of
``numNodes`` pods, and every pod derives TensorFlow's cluster spec from its JobSet identity:

- JobSet (its webhook) makes each child Job ``Indexed`` and turns DNS hostnames on: the pod of
  completion index ``i`` answers at ``<jobset>-<replicatedJob>-<jobIndex>-<i>.<subdomain>``,
  the subdomain defaulting to the JobSet's name (``JobSet.spec.network``); a TrainJob's JobSet
  has the TrainJob's name (Trainer's JAX policy addresses its coordinator the same way:
  ``<trainjob>-node-0-0.<trainjob>``);
- the Job controller gives each pod ``JOB_COMPLETION_INDEX``;
- the runtime passes the JobSet's annotations ``jobset.sigs.k8s.io/jobset-name``,
  ``.../replicatedjob-name`` and ``.../job-index`` through the downward API (``JOBSET_NAME``,
  ``REPLICATED_JOB_NAME``, ``JOB_INDEX``), and the TrainJob sets ``IMGPIPE_NUM_NODES`` beside
  ``numNodes`` (no pod can read its Job's completion count).

Every pod is a ``worker``; worker 0 is the chief, as MultiWorkerMirroredStrategy takes it when
the cluster has no ``chief`` task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from imgpipe.core.errors import InputError

TF_PORT = 2222
"""The port each worker's TensorFlow gRPC server listens on (TFJob's default, kept: the runtime
declares it as the container's port)."""

NUM_NODES = "IMGPIPE_NUM_NODES"
JOBSET_ENV = ("JOBSET_NAME", "REPLICATED_JOB_NAME", "JOB_INDEX", "JOB_COMPLETION_INDEX", NUM_NODES)
"""What a TrainJob pod of the imgpipe runtime has in its environment (see the module's text)."""
SUBDOMAIN = "JOBSET_SUBDOMAIN"
"""Optional: the JobSet's ``network.subdomain`` when it is not the JobSet's name."""


class TrainJobEnvError(InputError):
    """The JobSet environment is incomplete or inconsistent (the message names the variable)."""


def _index(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    if not value.isdigit():
        raise TrainJobEnvError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def tf_config_from_jobset(env: Mapping[str, str]) -> dict[str, Any]:
    """TF_CONFIG (as a dict) for this pod, from its JobSet environment ``env``.

    ``{"JOBSET_NAME": "ft", "REPLICATED_JOB_NAME": "node", "JOB_INDEX": "0",
    "JOB_COMPLETION_INDEX": "1", "IMGPIPE_NUM_NODES": "2"}`` gives
    ``{"cluster": {"worker": ["ft-node-0-0.ft:2222", "ft-node-0-1.ft:2222"]},
    "task": {"type": "worker", "index": 1}}``.
    """
    missing = [name for name in JOBSET_ENV if not env.get(name)]
    if missing:
        raise TrainJobEnvError(f"not a TrainJob pod of the imgpipe runtime: {missing} unset")
    nodes = _index(env, NUM_NODES)
    index = _index(env, "JOB_COMPLETION_INDEX")
    if not 0 <= index < nodes:
        raise TrainJobEnvError(
            f"JOB_COMPLETION_INDEX {index} is outside the {nodes} nodes ({NUM_NODES})"
        )
    prefix = f"{env['JOBSET_NAME']}-{env['REPLICATED_JOB_NAME']}-{_index(env, 'JOB_INDEX')}"
    subdomain = env.get(SUBDOMAIN) or env["JOBSET_NAME"]
    workers = [f"{prefix}-{i}.{subdomain}:{TF_PORT}" for i in range(nodes)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def set_tf_config(env: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``TF_CONFIG`` in ``env`` from the JobSet environment when it is absent and this is a
    TrainJob pod (``JOBSET_NAME`` set); True when it did. An explicit TF_CONFIG is kept."""
    if env.get("TF_CONFIG") or not env.get("JOBSET_NAME"):
        return False
    env["TF_CONFIG"] = json.dumps(tf_config_from_jobset(env))
    return True
