"""The QOM objects a migration uses, made with QMP ``object-add`` and removed with
``object-del``: ``tls-creds-x509`` (TLS credentials) and ``authz-list`` /
``authz-simple`` (the allow-list ``tls-authz`` names). QEMU's shapes::

    {"qom-type": "tls-creds-x509", "id": "tls0", "dir": "/etc/pki/qemu",
     "endpoint": "server", "verify-peer": true}
    {"qom-type": "authz-list", "id": "auth0", "policy": "deny",
     "rules": [{"match": "CN=src.example.com,O=Example", "policy": "allow",
                "format": "exact"}]}
    {"qom-type": "authz-simple", "id": "auth1", "identity": "CN=src.example.com"}

The migration parameters name them by id (``tls-creds``, ``tls-authz``) and are resolved
when a migration connects or accepts, so a missing object is that migration's error.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .transports.tls_credentials import AuthzList, AuthzRule, TlsCredentials, TlsSettings

QOM_TYPES = ("tls-creds-x509", "authz-list", "authz-simple")

_PROPERTIES = {
    "tls-creds-x509": {"dir", "endpoint", "verify-peer", "priority", "sanity-check"},
    "authz-list": {"policy", "rules"},
    "authz-simple": {"identity"},
}


class ObjectRegistry:
    """The engine's objects by id."""

    def __init__(self) -> None:
        self._objects: dict[str, TlsCredentials | AuthzList] = {}

    def add(self, arguments: dict[str, Any]) -> None:
        """object-add: make the object (reading its files now) or raise ConfigError."""
        properties = dict(arguments)
        qom_type = properties.pop("qom-type", None)
        object_id = properties.pop("id", None)
        if qom_type not in QOM_TYPES:
            raise ConfigError(
                f"object-add: qom-type {qom_type!r} is not one trimig makes "
                f"({', '.join(QOM_TYPES)})"
            )
        if not isinstance(object_id, str) or not object_id:
            raise ConfigError("object-add: 'id' must be a non-empty string")
        if object_id in self._objects:
            raise ConfigError(f"attempt to add duplicate property '{object_id}' to object")
        unknown = set(properties) - _PROPERTIES[qom_type]
        if unknown:
            raise ConfigError(
                f"object-add {qom_type}: unknown properties {', '.join(sorted(unknown))}"
            )
        self._objects[object_id] = _make(qom_type, object_id, properties)

    def delete(self, object_id: str) -> None:
        if self._objects.pop(object_id, None) is None:
            raise ConfigError(f"object '{object_id}' not found")

    def ids(self) -> list[str]:
        return list(self._objects)

    def credentials(self, object_id: str) -> TlsCredentials:
        found = self._objects.get(object_id)
        if not isinstance(found, TlsCredentials):
            raise ConfigError(f"No TLS credentials with id '{object_id}'")
        return found

    def authz(self, object_id: str) -> AuthzList:
        found = self._objects.get(object_id)
        if not isinstance(found, AuthzList):
            raise ConfigError(
                f"the tls-authz object '{object_id}' does not exist: access denied to every source"
            )
        return found

    def tls_settings(self, parameters: dict[str, Any], *, incoming: bool) -> TlsSettings | None:
        """The TLS of a migration from the parameters (``tls-creds``, ``tls-hostname``,
        ``tls-authz``): None when tls-creds is empty."""
        creds = parameters.get("tls-creds") or ""
        if not creds:
            return None
        credentials = self.credentials(creds)
        authz_id = parameters.get("tls-authz") or ""
        lookup = (lambda: self.authz(authz_id)) if incoming and authz_id else None
        return TlsSettings(credentials, hostname=parameters.get("tls-hostname") or "", authz=lookup)


def _string(qom_type: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"object-add {qom_type}: '{name}' must be a string, not {value!r}")
    return value


def _choice(qom_type: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(
            f"object-add {qom_type}: '{name}' must be one of {', '.join(choices)}, not {value!r}"
        )
    return str(value)


def _make(qom_type: str, object_id: str, properties: dict[str, Any]) -> TlsCredentials | AuthzList:
    if qom_type == "tls-creds-x509":
        if "dir" not in properties:
            raise ConfigError("object-add tls-creds-x509: 'dir' is required")
        verify = properties.get("verify-peer", True)
        if not isinstance(verify, bool):
            raise ConfigError("object-add tls-creds-x509: 'verify-peer' must be a boolean")
        return TlsCredentials(
            object_id,
            _string(qom_type, "dir", properties["dir"]),
            endpoint=_choice(
                qom_type, "endpoint", properties.get("endpoint", "client"), ("client", "server")
            ),
            verify_peer=verify,
        )
    if qom_type == "authz-simple":
        identity = _string(qom_type, "identity", properties.get("identity"))
        return AuthzList(object_id, (AuthzRule(identity),), policy="deny")
    rules = properties.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError("object-add authz-list: 'rules' must be a list")
    made = []
    for index, rule in enumerate(rules):
        if not isinstance(rule, dict) or "match" not in rule:
            raise ConfigError(f"object-add authz-list: rule {index} needs a 'match'")
        made.append(
            AuthzRule(
                _string(qom_type, "match", rule["match"]),
                policy=_choice(qom_type, "policy", rule.get("policy", "allow"), ("allow", "deny")),
                format=_choice(qom_type, "format", rule.get("format", "exact"), ("exact", "glob")),
            )
        )
    policy = _choice(qom_type, "policy", properties.get("policy", "deny"), ("allow", "deny"))
    return AuthzList(object_id, tuple(made), policy=policy)
