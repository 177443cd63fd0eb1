"""Who may do what on the MLflow server: the accounts of the Kubernetes deployment and the error
a refused call becomes.

The deployment (``infra/k8s/base/mlflow.yaml``) runs MLflow's basic-auth app
(``mlflow server --app-name basic-auth``), which keeps users and permissions in its own tables
beside the tracking store. Three kinds of account:

- the admin (the Secret ``mlflow-auth``): everything, including who may do what;
- the pipeline (the Secret ``mlflow-pipeline``): EDIT on the pipeline's experiment and on the
  registered model, so it logs runs, registers versions, moves ``champion`` and ``challenger``
  and tags versions; it cannot delete them or grant anything;
- read-only users (the Secret ``mlflow-readers``, a key per user): the server's default
  permission, READ (MLflow still lets any signed-in user create experiments and models of
  their own; without workspaces it has no switch against that).

``provision`` makes the admin's side of it, idempotently (``imgpipe mlflow-access``, run by the
deployment's Job). Every client reads its credentials from MLflow's own environment variables
(``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD``). The local default, a SQLite file
with no server, has no accounts and needs none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
PIPELINE_SECRET = "mlflow-pipeline"
"""The Kubernetes Secret (type basic-auth: ``username``, ``password``) the pipeline's steps read
their account from, in the pipeline's namespace (``pipelines/kubeflow.py``)."""
PIPELINE_PERMISSION = "EDIT"
REFUSED = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
"""MLflow's error codes for a request without valid credentials and one without permission."""


class AccessError(RuntimeError):
    """MLflow refused a call: no or wrong credentials (401), or a missing permission (403)."""


def on_model(name: str) -> str:
    return f"{PIPELINE_PERMISSION} on registered model {name!r}"


def on_experiment(name: str) -> str:
    return f"{PIPELINE_PERMISSION} on experiment {name!r}"


def on_run(run_id: str) -> str:
    return f"{PIPELINE_PERMISSION} on the experiment of run {run_id}"


@contextlib.contextmanager
def needs(permission: str, action: str, server: str | None = None) -> Iterator[None]:
    """Inside the block, MLflow's 401 and 403 become an AccessError that says what was refused
    (``action``, on ``server``: default the tracking URI), which permission it takes, and how
    to get it."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code not in REFUSED:
            raise
        raise AccessError(refusal(exc.error_code, permission, action, server)) from None


def refused(exc: BaseException) -> str | None:
    """What to tell the user when ``exc`` is MLflow's 401 or 403 met outside any ``needs``
    block (the permission is then unknown); None for anything else."""
    code = getattr(exc, "error_code", None)
    if code not in REFUSED or "mlflow.exceptions" not in sys.modules:
        return None
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return None
    return refusal(code, "an account allowed this call", "answer")


def refusal(code: str, permission: str, action: str, server: str | None = None) -> str:
    import mlflow

    user = os.environ.get(USER_ENV)
    if code == "UNAUTHENTICATED":
        reason = (
            f"the server did not accept user {user!r} (wrong password?)"
            if user
            else f"no user was given ({USER_ENV} and {PASSWORD_ENV} are not set; under "
            f"Kubeflow they come from the Secret {PIPELINE_SECRET!r})"
        )
    else:
        reason = (
            f"user {user!r} does not have it: an admin grants it "
            "(`imgpipe mlflow-access`, or MLflow's permissions API)"
        )
    return (
        f"MLflow at {server or mlflow.get_tracking_uri()} refused to {action}: "
        f"{REFUSED[code]} {code}. It needs {permission}; {reason}"
    )


def read_accounts(folder: Path) -> dict[str, str]:
    """Users and passwords from a folder with a file per user (a mounted Secret: the key is the
    user name, the value the password; Kubernetes' ``..data`` links are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no accounts folder {folder} (a mounted Secret, a file per user)")
    accounts = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        password = path.read_text(encoding="utf-8").strip()
        if not password:
            raise InputError(f"{path}: empty password for user {path.name!r}")
        accounts[path.name] = password
    return accounts


def _set_user(auth: Any, name: str, password: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        auth.create_user(name, password)
        return "created"
    except MlflowException as exc:
        if exc.error_code in REFUSED:
            raise
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # a password MLflow refuses, say
            raise InputError(f"MLflow user {name!r}: {exc.message}") from None
    auth.update_user_password(name, password)  # a changed Secret: its new password
    return "password set"


def _grant(auth: Any, user: str, kind: str, resource: str, permission: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(user, kind, resource, permission)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(user, kind, resource)
        auth.grant_user_permission(user, kind, resource, permission)


def provision(
    server: str,
    *,
    experiment_id: str,
    model: str,
    pipeline: tuple[str, str],
    readers: Mapping[str, str],
) -> dict[str, Any]:
    """As the admin (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) of ``server``: the pipeline's
    account and the read-only users with these passwords (set again when they exist, so a
    changed password is a rerun), and the pipeline's EDIT on the experiment and the registered
    model (which the admin makes first: ``imgpipe mlflow-access``). Users no longer listed are
    left as they are: removing one is the admin's explicit act. Returns what it did."""
    from mlflow.server import get_app_client

    pipeline_user, pipeline_password = pipeline
    if pipeline_user in readers:
        raise InputError(f"{pipeline_user!r} is both the pipeline's account and a reader")
    auth = get_app_client("basic-auth", tracking_uri=server)
    with needs("the admin's account", f"manage the users of {server}", server):
        users = {
            name: _set_user(auth, name, password)
            for name, password in {pipeline_user: pipeline_password, **readers}.items()
        }
        _grant(auth, pipeline_user, "experiment", experiment_id, PIPELINE_PERMISSION)
        _grant(auth, pipeline_user, "registered_model", model, PIPELINE_PERMISSION)
    summary = {
        "server": server,
        "users": users,
        "pipeline": pipeline_user,
        "readers": sorted(readers),
        "grants": [f"{PIPELINE_PERMISSION} on experiment {experiment_id}", on_model(model)],
    }
    log.info(
        "mlflow-access: %s; %s gets %s", ", ".join(f"{u} {what}" for u, what in users.items()),
        pipeline_user, " and ".join(summary["grants"]),
    )  # fmt: skip
    return summary
