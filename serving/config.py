"""TF Serving's configuration files, read the way ``tensorflow_model_server`` reads them.

- ``--model_config_file``: a text ``tensorflow.serving.ModelServerConfig`` (from
  ``tensorflow-serving-api``);
- ``--batching_parameters_file``: a text ``tensorflow.serving.BatchingParameters``;
- ``--monitoring_config_file``: a text ``tensorflow.serving.MonitoringConfig``;
- ``--ssl_config_file``: a text ``tensorflow.serving.SSLConfig`` (the gRPC port's TLS).

The last three messages are not shipped in the ``tensorflow-serving-api`` wheel, so their fields
are declared here (names and types as in TF Serving's ``session_bundle_config.proto``,
``monitoring_config.proto`` and ``ssl_config.proto``) and parsed with the same strict text-format
parser: an unknown or misspelt field is an error naming the file and line, as in TF Serving.

The served model's name is ``serving.model_name`` in ``params.yaml``. ``serving/models.config``
is the template (and the file the real ``tensorflow/serving`` container reads for the default
name); ``make serve`` renders it for the name in ``params.yaml``:

    python -m serving.config --params params.yaml --out outputs/serving/models.config

An SSLConfig holds PEM contents, a private key among them; write it from the PEM files rather
than by hand (the file is written with mode 0600):

    python -m serving.config ssl --key server.key --cert server.crt \
        [--ca ca.crt --client-verify] --out ssl.config
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any

# The protobuf modules load where they are used: `imgpipe predict` reads only the model name.

HERE = Path(__file__).resolve().parent
MODEL_CONFIG = HERE / "models.config"
BATCHING_CONFIG = HERE / "batching.config"
MONITORING_CONFIG = HERE / "monitoring.config"


class ConfigError(ValueError):
    """A serving config file is missing or does not parse."""


def _parse(path: Path, message: Any) -> Any:
    from google.protobuf import text_format

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def read_model_config(path: Path) -> Any:
    from tensorflow_serving.config import model_server_config_pb2

    """A ``ModelServerConfig`` with a ``model_config_list`` whose models are all TensorFlow."""
    config = _parse(path, model_server_config_pb2.ModelServerConfig())
    check_model_config(config, str(path))
    return config


def check_model_config(config: Any, where: str) -> None:
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{where}: expected a model_config_list")
    names = [m.name for m in config.model_config_list.config]
    if not names:
        raise ConfigError(f"{where}: the model_config_list names no model")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a model name appears twice: {names}")
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ConfigError(f"{where}: every model needs a name and a base_path")
        if model.model_platform not in ("", "tensorflow"):
            raise ConfigError(
                f"{where}: model {model.name!r} has platform {model.model_platform!r}; "
                "only 'tensorflow' SavedModels are served"
            )


def served_model_name(params_path: Path) -> str:
    """``serving.model_name`` of a params file; only its ``serving`` section is read."""
    import yaml

    try:
        params = yaml.safe_load(Path(params_path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {params_path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{params_path} is not valid YAML: {exc}") from None
    serving = params.get("serving") if isinstance(params, dict) else None
    if not isinstance(serving, dict):
        raise ConfigError(f"{params_path}: no 'serving' section")
    if "model_name" not in serving:
        raise ConfigError(f"{params_path}: serving.model_name is missing")
    name = serving["model_name"]
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{params_path}: serving.model_name must name a folder, got {name!r}")
    return name


def model_config_for(name: str, template: Any) -> Any:
    """``template`` (a one-model ModelServerConfig) serving ``name`` from the folder ``name``
    beside the template's base path (``/models/<name>``); every other setting is kept."""
    config = type(template)()
    config.CopyFrom(template)
    models = config.model_config_list.config
    if len(models) != 1:
        raise ConfigError(f"the template must configure one model, it has {len(models)}")
    models[0].base_path = str(PurePosixPath(models[0].base_path).parent / name)
    models[0].name = name
    return config


def write_config(config: Any, path: Path, source: str, *, mode: int = 0o666) -> Path:
    """``config`` in text format at ``path``, written whole and renamed into place; the file is
    created with ``mode`` (less the umask), so a private one is never readable by others."""
    from google.protobuf import text_format

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover would keep its own mode
    text = (
        f"# Generated by `python -m serving.config` from {source}; edit those, not this file.\n"
        + text_format.MessageToString(config)
    )
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as f:
        f.write(text)
    tmp.replace(path)
    return path


def versions_to_serve(available: list[int], policy: Any) -> list[int]:
    """What TF Serving's ``model_version_policy`` keeps of the version folders present:
    ``latest`` (default, 1 version), ``all`` or ``specific``."""
    available = sorted(available)
    kind = policy.WhichOneof("policy_choice") if policy is not None else None
    if kind == "all":
        return available
    if kind == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    count = policy.latest.num_versions if kind == "latest" else 1
    return available[-max(1, count) :] if available else []


@functools.cache
def _extra_messages() -> dict[str, Any]:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    """BatchingParameters and MonitoringConfig, declared field for field."""
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="imgpipe/serving_extra.proto",
        package="tensorflow.serving",
        dependency=["google/protobuf/wrappers.proto"],
        syntax="proto3",
    )

    def message(name: str, fields: list[tuple[str, int, str | None, bool]]) -> None:
        m = proto.message_type.add(name=name)
        for number, (field, kind, type_name, repeated) in enumerate(fields, start=1):
            added = m.field.add(
                name=field,
                number=number,
                type=kind,
                label=f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL,
            )
            if type_name:
                added.type_name = type_name

    int64_value, string_value, bool_value = (
        ".google.protobuf.Int64Value",
        ".google.protobuf.StringValue",
        ".google.protobuf.BoolValue",
    )
    msg = f.TYPE_MESSAGE
    message(
        "BatchingParameters",
        [
            ("max_batch_size", msg, int64_value, False),
            ("batch_timeout_micros", msg, int64_value, False),
            ("thread_pool_name", msg, string_value, False),
            ("num_batch_threads", msg, int64_value, False),
            ("max_enqueued_batches", msg, int64_value, False),
            ("allowed_batch_sizes", f.TYPE_INT64, None, True),
            ("pad_variable_length_inputs", f.TYPE_BOOL, None, False),
            ("enable_large_batch_splitting", msg, bool_value, False),
            ("max_execution_batch_size", msg, int64_value, False),
        ],
    )
    message(
        "PrometheusConfig",
        [("enable", f.TYPE_BOOL, None, False), ("path", f.TYPE_STRING, None, False)],
    )
    message(
        "MonitoringConfig",
        [("prometheus_config", msg, ".tensorflow.serving.PrometheusConfig", False)],
    )
    message(
        "SSLConfig",
        [
            ("server_key", f.TYPE_STRING, None, False),
            ("server_cert", f.TYPE_STRING, None, False),
            ("custom_ca", f.TYPE_STRING, None, False),
            ("client_verify", f.TYPE_BOOL, None, False),
        ],
    )
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"tensorflow.serving.{name}")
        )
        for name in ("BatchingParameters", "MonitoringConfig", "SSLConfig")
    }


def read_batching_parameters(path: Path | None) -> Any:
    """The file's BatchingParameters; no file: all defaults (as ``--enable_batching`` alone)."""
    if path is None:
        return _extra_messages()["BatchingParameters"]()
    params = _parse(path, _extra_messages()["BatchingParameters"]())
    size = params.max_batch_size.value if params.HasField("max_batch_size") else 0
    if params.HasField("max_batch_size") and size < 1:
        raise ConfigError(f"{path}: max_batch_size must be >= 1, got {size}")
    if any(b > size for b in params.allowed_batch_sizes) and size:
        raise ConfigError(f"{path}: allowed_batch_sizes exceed max_batch_size {size}")
    return params


def read_monitoring_config(path: Path) -> Any:
    return _parse(path, _extra_messages()["MonitoringConfig"]())


PEM_KINDS = {"key": r"(?:RSA |EC )?PRIVATE KEY", "certificate": "CERTIFICATE"}
"""The PEM blocks gRPC's TLS takes: an unencrypted private key (PKCS#8, PKCS#1 or SEC 1), and
X.509 certificates (a chain or a CA bundle may hold several)."""


def check_pem(text: str, kind: str, where: str) -> None:
    """Raise unless ``text`` holds a complete PEM block of ``kind`` (a ``PEM_KINDS`` key);
    gRPC would only fail later, at the first handshake, with a vaguer message."""
    label = PEM_KINDS[kind]
    if not re.search(rf"-----BEGIN ({label})-----\s.*?-----END \1-----", text, re.DOTALL):
        found = re.search(r"-----BEGIN ([A-Z0-9 ]+)-----", text)
        got = f"a PEM {found.group(1)}" if found else "no PEM block"
        raise ConfigError(f"{where}: expected a PEM {kind}, found {got}")


def check_ssl_config(config: Any, where: str) -> None:
    """What ``tensorflow_model_server`` needs of an SSLConfig: a key and its certificate, and
    the CA that signs client certificates when it verifies them."""
    for field, kind in (("server_key", "key"), ("server_cert", "certificate")):
        if not getattr(config, field).strip():
            raise ConfigError(f"{where}: {field} is missing (the PEM {kind} itself, not a path)")
        check_pem(getattr(config, field), kind, f"{where}: {field}")
    if config.custom_ca.strip():
        check_pem(config.custom_ca, "certificate", f"{where}: custom_ca")
    elif config.client_verify:
        raise ConfigError(
            f"{where}: client_verify is true but custom_ca is empty: no CA to verify the "
            "client certificates with"
        )


def read_ssl_config(path: Path) -> Any:
    """The file's SSLConfig, checked: PEM contents in its fields, as TF Serving takes them."""
    config = _parse(path, _extra_messages()["SSLConfig"]())
    check_ssl_config(config, str(path))
    return config


def read_pem(path: Path, kind: str, what: str | None = None) -> str:
    """The PEM file ``path``, checked to hold a ``kind`` (a ``PEM_KINDS`` key); errors name
    the file (as ``what``, default the kind)."""
    try:  # a DER file decodes to no PEM block
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read {what or f'the {kind}'} {path}: {exc.strerror}") from None
    check_pem(text, kind, f"{what} {path}" if what else str(path))
    return text


def ssl_config_from_files(
    key: Path, cert: Path, ca: Path | None = None, client_verify: bool = False
) -> Any:
    """An SSLConfig holding the contents of PEM files; errors name the file."""
    config = _extra_messages()["SSLConfig"](
        server_key=read_pem(key, "key"),
        server_cert=read_pem(cert, "certificate"),
        custom_ca=read_pem(ca, "certificate") if ca else "",
        client_verify=client_verify,
    )
    check_ssl_config(config, "the SSL config")
    return config


def batching_settings(params: Any) -> dict[str, float | int]:
    """The batching parameters with TF Serving's defaults filled in."""

    def value(field: str, default: int) -> int:
        return getattr(params, field).value if params.HasField(field) else default

    return {
        "max_batch_size": value("max_batch_size", 1000),
        "batch_timeout_s": value("batch_timeout_micros", 0) / 1e6,
        "num_batch_threads": value("num_batch_threads", 4),
        "max_enqueued_batches": value("max_enqueued_batches", 10),
    }


def _models(args: argparse.Namespace) -> str:
    name = served_model_name(args.params)
    config = model_config_for(name, read_model_config(args.template))
    write_config(config, args.out, f"{args.params} (serving.model_name) and {args.template}")
    (model,) = config.model_config_list.config
    return f"model {model.name!r} at {model.base_path}"


def _ssl(args: argparse.Namespace) -> str:
    if args.client_verify and not args.ca:
        raise ConfigError("--client-verify needs --ca, the CA that signs the client certificates")
    config = ssl_config_from_files(args.key, args.cert, args.ca, args.client_verify)
    sources = ", ".join(str(p) for p in (args.key, args.cert, args.ca) if p)
    write_config(config, args.out, sources, mode=0o600)  # it holds the private key
    return f"{'mTLS' if config.client_verify else 'TLS'} for --ssl_config_file (mode 0600)"


COMMANDS = ("models", "ssl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.config",
        description="Write TF Serving's config files: the model config for serving.model_name "
        "in params.yaml (`models`, the default command), or an SSLConfig from PEM files (`ssl`).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{models,ssl}")
    models = sub.add_parser("models", help="render the model config for params.yaml")
    models.set_defaults(run=_models)
    models.add_argument("--params", type=Path, default=Path("params.yaml"))
    models.add_argument("--template", type=Path, default=MODEL_CONFIG)
    models.add_argument("--out", type=Path, required=True)
    ssl = sub.add_parser("ssl", help="write an SSLConfig (--ssl_config_file) from PEM files")
    ssl.set_defaults(run=_ssl)
    ssl.add_argument("--key", type=Path, required=True, help="the server's private key (PEM)")
    ssl.add_argument("--cert", type=Path, required=True, help="its certificate (chain), PEM")
    ssl.add_argument("--ca", type=Path, help="CA bundle (PEM) that signs client certificates")
    ssl.add_argument(
        "--client-verify", action="store_true", help="require client certificates (mTLS)"
    )
    ssl.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "models")  # the command `make serve` has always run
    args = build_parser().parse_args(argv)
    try:
        written = args.run(args)
    except ConfigError as exc:
        print(f"serving.config: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
