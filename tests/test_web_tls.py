"""The real skin-fl-web server beyond loopback: HTTPS with the site's certificate, and no plain HTTP."""

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client.web.users import UserList
from web_support import train_tiny_model

pytestmark = pytest.mark.slow


def _self_signed(folder):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "skin-fl-web test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "cert.pem", folder / "key.pem"


def test_all_interfaces_with_tls_serve_https_and_refuse_plain_http(tmp_path):
    # Without the TLS files the same command is refused; test_web_api checks that without a server.
    model = train_tiny_model(tmp_path / "final_model.pt")
    token = UserList(tmp_path / "web" / "users.json").add("it.admin")
    certificate, key = _self_signed(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "client.web_cli", "serve", "--data-dir", str(tmp_path / "web"), "--model", str(model),
               "--host", "0.0.0.0", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--tls-certfile", str(certificate), "--tls-keyfile", str(key)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    trusted = ssl.create_default_context(cafile=str(certificate))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(f"https://127.0.0.1:{port}/api/me", headers={"Authorization": f"Bearer {token}"}, verify=trusted)
                break
            except httpx.ConnectError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-2000:]
                time.sleep(0.2)
        assert answer.json() == {"user": "it.admin"}
        assert "content-security-policy" in answer.headers
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)
    finally:
        process.terminate()
        process.wait(timeout=10)
