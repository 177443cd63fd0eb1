"""TLS on the gRPC port, as TF Serving's ``--ssl_config_file`` sets it up: the SSLConfig reader
and writer, the local server over TLS and mTLS, and ``imgpipe predict``'s errors when the
handshake fails.

A test CA, a server certificate for 127.0.0.1 and localhost, a client certificate and an
unrelated CA are made here with ``cryptography``. The TLS server is a child process on
127.0.0.1 (stopped by PID); the mTLS one runs in this process on the same exported version.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import class_pattern, encode_image

from serving import config
from serving.process import ServerProcess, model_config

MODEL = "tls"
LABELS = ("crack", "finger", "intact")


@dataclass(frozen=True)
class PKI:
    """PEM files in one folder: ``ca`` signed ``server`` (127.0.0.1, localhost) and
    ``client``; ``other_ca`` signed ``stranger``, a client certificate no server trusts."""

    folder: Path

    def __getattr__(self, name: str) -> Path:
        """``pki.other_ca_crt`` is ``other-ca.crt`` in the folder."""
        stem, _, suffix = name.rpartition("_")
        if name.startswith("__") or not stem:
            raise AttributeError(name)
        return self.folder / f"{stem.replace('_', '-')}.{suffix}"


def _make_pki(folder: Path) -> PKI:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, issuer: tuple | None, extensions: list) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        signer_key, signer = issuer or (key, None)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(signer.subject if signer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        cert = builder.sign(signer_key, hashes.SHA256())
        (folder / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    def usage(purpose: x509.ObjectIdentifier) -> tuple:
        return x509.ExtendedKeyUsage([purpose]), False

    ca_extensions = [(x509.BasicConstraints(ca=True, path_length=None), True)]
    folder.mkdir(parents=True, exist_ok=True)
    ca, other_ca = issue("ca", None, ca_extensions), issue("other-ca", None, ca_extensions)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    issue(
        "server",
        ca,
        [(x509.SubjectAlternativeName(names), False), usage(ExtendedKeyUsageOID.SERVER_AUTH)],
    )
    issue("client", ca, [usage(ExtendedKeyUsageOID.CLIENT_AUTH)])
    issue("stranger", other_ca, [usage(ExtendedKeyUsageOID.CLIENT_AUTH)])
    return PKI(folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return _make_pki(tmp_path_factory.mktemp("pki"))


def _write_ssl_config(pki: PKI, out: Path, *, client_verify: bool = False) -> Path:
    """What a user runs: ``python -m serving.config ssl`` (in-process)."""
    flags = ["--ca", str(pki.ca_crt), "--client-verify"] if client_verify else []
    argv = ["ssl", "--key", str(pki.server_key), "--cert", str(pki.server_crt), *flags]
    assert config.main([*argv, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, export_classifier) -> Path:
    """One exported version, ``models/tls/1``, shared by both servers."""
    root = tmp_path_factory.mktemp("tls-models")
    export_classifier(root / MODEL / "1", MODEL, LABELS, seed=1)
    return root


@pytest.fixture(scope="module")
def tls_server(models, pki, tmp_path_factory):
    work = tmp_path_factory.mktemp("tls-server")
    ssl = _write_ssl_config(pki, work / "ssl.config")
    models_config = model_config(work / "models.config", MODEL, f"/models/{MODEL}")
    args = ["--model_config_file", str(models_config), "--mount", f"{models}:/models"]
    server = ServerProcess([*args, "--ssl_config_file", str(ssl)], work)
    yield server
    code = server.stop()
    assert code == 0, f"server exited {code} on SIGTERM:\n{server.output()}"


@pytest.fixture(scope="module")
def mtls_server(models, pki, tmp_path_factory):
    """The same server code in this process, verifying clients against ``ca``."""
    from serving.transport import server_credentials

    ssl = _write_ssl_config(pki, tmp_path_factory.mktemp("mtls") / "ssl.config", client_verify=True)
    with _in_process(models, server_credentials(config.read_ssl_config(ssl))) as server:
        yield server


@contextlib.contextmanager
def _in_process(models: Path, credentials: Any = None) -> Iterator[Any]:
    """The server code in this process on ``models`` (TLS with ``credentials``), started."""
    from tensorflow_serving.config import model_server_config_pb2

    from serving.manager import ModelManager
    from serving.server import LocalServer

    served = model_server_config_pb2.ModelServerConfig()
    served.model_config_list.config.add(name=MODEL, base_path=str(models / MODEL))
    server = LocalServer(ModelManager(served, poll_seconds=0), port=0, credentials=credentials)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=1)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "cell.png"
    path.write_bytes(encode_image(class_pattern(0, (48, 40), seed=7), "PNG"))
    return path


def _predict(capsys, image: Path, address: str, *flags: object) -> tuple[int, str, str]:
    """``imgpipe predict`` in this process: exit status, stdout, stderr."""
    from commands import main

    capsys.readouterr()
    argv = ["predict", str(image), "--server", address, "--model", MODEL, "--retries", "0"]
    status = main([*argv, *map(str, flags)])
    out, err = capsys.readouterr()
    return status, out, err


# -- the SSLConfig file ---------------------------------------------------------------------


def test_ssl_config_writer_is_private_and_round_trips(pki, tmp_path):
    """Guards the writer: the file holds the PEM contents (TF Serving's fields), is created
    0600 (it holds the private key), and reads back with real proto semantics."""
    out = _write_ssl_config(pki, tmp_path / "ssl.config", client_verify=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    read = config.read_ssl_config(out)
    assert read.DESCRIPTOR.full_name == "tensorflow.serving.SSLConfig"
    assert read.server_key == pki.server_key.read_text()
    assert read.server_cert == pki.server_crt.read_text()
    assert read.custom_ca == pki.ca_crt.read_text()
    assert read.client_verify is True


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "server_keys: 'x'\n",
            r"ssl\.config: 1:1 : .*no field named \"server_keys\"",
        ),  # proto's own parser
        ("server_cert: {cert}\n", r"ssl\.config: server_key is missing"),
        ("server_key: {key}\n", r"ssl\.config: server_cert is missing"),
        (
            "server_key: {key}\nserver_cert: {key}\n",
            r"ssl\.config: server_cert: expected a PEM certificate, found a PEM PRIVATE KEY",
        ),
        (
            "server_key: 'server.key'\nserver_cert: {cert}\n",
            r"ssl\.config: server_key: expected a PEM key, found no PEM block",
        ),
        (
            "server_key: {key}\nserver_cert: {cert}\nclient_verify: true\n",
            r"ssl\.config: client_verify is true but custom_ca is empty",
        ),
    ],
    ids=["unknown field", "no key", "no cert", "key as cert", "a path", "verify without ca"],
)
def test_ssl_config_errors_name_the_file_and_field(pki, tmp_path, text, says):
    def quoted(path: Path) -> str:
        return '"' + path.read_text().replace("\n", "\\n") + '"'

    path = tmp_path / "ssl.config"
    path.write_text(text.format(key=quoted(pki.server_key), cert=quoted(pki.server_crt)))
    with pytest.raises(config.ConfigError, match=says):
        config.read_ssl_config(path)


def test_ssl_config_writer_refuses_non_pem_and_verify_without_ca(pki, tmp_path, capsys):
    """Guards the writer's errors: a file that is not the PEM asked for, a missing file and
    --client-verify without --ca are named, the exit status is 2, and nothing is written."""
    out = tmp_path / "ssl.config"
    cases = [
        (
            ["--key", pki.server_crt, "--cert", pki.server_crt],
            f"{pki.server_crt}: expected a PEM key",
        ),
        (["--key", pki.server_key, "--cert", tmp_path / "none.crt"], "cannot read the certificate"),
        (["--key", pki.server_key, "--cert", pki.server_crt, "--client-verify"], "needs --ca"),
    ]
    for flags, says in cases:
        assert config.main(["ssl", *map(str, flags), "--out", str(out)]) == 2
        assert says in capsys.readouterr().err
        assert not out.exists()


# -- the server's bind rule -----------------------------------------------------------------


def test_plaintext_off_loopback_is_refused(capsys):
    """Guards the local default: without --ssl_config_file only loopback is bound; any other
    host is refused, naming the flag, before a model is read."""
    from serving.server import main
    from serving.transport import is_loopback

    assert main(["--host", "0.0.0.0", "--model_name", MODEL, "--model_base_path", "none"]) == 2
    error = capsys.readouterr().err
    assert "--host 0.0.0.0 is not a loopback address" in error and "--ssl_config_file" in error
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "serving.example"]))


# -- the client's files ---------------------------------------------------------------------


def test_client_tls_files_are_checked_before_any_call(pki, tmp_path, image, capsys):
    from serving.client import TLS, ServingClient, ServingClientError

    missing = tmp_path / "missing-ca.crt"
    with pytest.raises(ServingClientError, match=f"cannot read the CA certificate {missing}"):
        ServingClient("127.0.0.1:1", tls=TLS(ca_cert=missing))
    with pytest.raises(
        ServingClientError, match=f"client key {pki.client_crt}: expected a PEM key"
    ):
        ServingClient("127.0.0.1:1", tls=TLS(pki.ca_crt, pki.client_crt, pki.client_crt))
    status, _, err = _predict(capsys, image, "127.0.0.1:1", "--client-cert", pki.client_crt)
    assert status == 1 and "--client-cert and --client-key" in err, err


# -- TLS and mTLS servers -------------------------------------------------------------------


@pytest.mark.slow
def test_predict_over_tls_with_the_ca(tls_server, pki, image, capsys):
    """Guards TLS end to end: the server says it serves TLS, and ``imgpipe predict --ca-cert``
    gets labels, also when the certificate's name is given with --tls-server-name."""
    assert f"gRPC (TLS) on {tls_server.address}" in tls_server.output()
    for flags in (
        ["--ca-cert", pki.ca_crt],
        ["--ca-cert", pki.ca_crt, "--tls-server-name", "localhost"],
    ):
        status, out, err = _predict(capsys, image, tls_server.address, *flags)
        assert status == 0, err
        assert out.startswith(f"{image}: ") and f"({MODEL} v1)" in out, out
        assert out.split(": ")[1].split()[0] in LABELS, out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ["--tls"],  # gRPC's public roots do not hold the test CA
            "the TLS handshake failed: the server's certificate was not verified (unable to get "
            "local issuer certificate); pass the CA that signed it with --ca-cert",
        ),
        (
            ["--ca-cert", "other-ca.crt"],
            "the server's certificate was not verified (unable to get local issuer certificate)",
        ),
        (
            ["--ca-cert", "ca.crt", "--tls-server-name", "elsewhere.example"],
            "the server's certificate does not name the host connected to",
        ),
        ([], "the server closed the connection: it may require TLS (pass --ca-cert or --tls)"),
    ],
    ids=["default roots", "unrelated CA", "wrong name", "plaintext"],
)
def test_predict_without_trust_in_the_server_is_a_clear_error(
    tls_server, pki, image, capsys, flags, says
):
    flags = [pki.folder / f if f.endswith(".crt") else f for f in flags]
    status, out, err = _predict(capsys, image, tls_server.address, *flags)
    assert status == 1 and not out
    assert f"Predict(model '{MODEL}') on {tls_server.address} failed: UNAVAILABLE: " in err, err
    assert says in err, err


@pytest.mark.slow
def test_a_tls_client_of_a_plaintext_server_is_told_so(models, pki, image, capsys):
    """The other way round: a TLS client (--ca-cert) of a plaintext server learns that the
    server did not answer in TLS."""
    with _in_process(models) as plaintext:
        status, out, err = _predict(capsys, image, plaintext.address, "--ca-cert", pki.ca_crt)
    assert status == 1 and not out
    assert "the TLS handshake failed: the server did not answer in TLS" in err, err


@pytest.mark.slow
def test_client_error_keeps_the_grpc_status(tls_server, pki):
    from serving.client import TLS, ServingClient, ServingClientError

    with (
        ServingClient(tls_server.address, retries=0, tls=TLS(pki.other_ca_crt)) as client,
        pytest.raises(ServingClientError) as info,
    ):
        client.status(MODEL)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.details


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["client.crt", "client.key"], None),
        ([], "it may require a client certificate (mTLS): pass --client-cert and --client-key"),
        (["stranger.crt", "stranger.key"], "it may not trust the client certificate"),
    ],
    ids=["client cert", "no client cert", "untrusted client cert"],
)
def test_mtls_needs_a_client_certificate_the_server_trusts(
    mtls_server, pki, image, capsys, flags, says
):
    names = ("--client-cert", "--client-key")
    mtls = [
        item for name, file in zip(names, flags, strict=False) for item in (name, pki.folder / file)
    ]
    args = ["--ca-cert", pki.ca_crt, *mtls]
    status, out, err = _predict(capsys, image, mtls_server.address, *args)
    if says is None:
        assert status == 0 and f"({MODEL} v1)" in out, err
    else:
        assert status == 1 and says in err, err
