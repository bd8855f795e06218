"""Test certificates in QEMU's tls-creds-x509 layout, made with trustme in a directory."""

from __future__ import annotations

import datetime
import os

import trustme

HOSTS = ("localhost", "127.0.0.1")
CLIENT_NAME = "source.trimig.test"


def write_creds(
    directory: str,
    ca: trustme.CA,
    *,
    server_ca: trustme.CA | None = None,
    client_ca: trustme.CA | None = None,
    hosts: tuple[str, ...] = HOSTS,
    client_name: str = CLIENT_NAME,
    expired: bool = False,
) -> str:
    """``directory`` with ca-cert.pem (``ca``), server-cert/key.pem (signed by
    ``server_ca``, default ``ca``) and client-cert/key.pem (``client_ca``, default ``ca``),
    the client's subject ``CN=client_name,OU=...,O=trustme``; ``expired`` dates the server
    certificate in the past. Returns the directory."""
    os.makedirs(directory, exist_ok=True)
    ca.cert_pem.write_to_path(os.path.join(directory, "ca-cert.pem"))
    now = datetime.datetime.now(datetime.UTC)
    dates = (
        {
            "not_before": now - datetime.timedelta(days=10),
            "not_after": now - datetime.timedelta(days=1),
        }
        if expired
        else {}
    )
    server = (server_ca or ca).issue_cert(*hosts, **dates)
    server.cert_chain_pems[0].write_to_path(os.path.join(directory, "server-cert.pem"))
    server.private_key_pem.write_to_path(os.path.join(directory, "server-key.pem"))
    client = (client_ca or ca).issue_cert(client_name, common_name=client_name)
    client.cert_chain_pems[0].write_to_path(os.path.join(directory, "client-cert.pem"))
    client.private_key_pem.write_to_path(os.path.join(directory, "client-key.pem"))
    return directory
