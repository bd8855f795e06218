"""Migration status, capabilities, parameters and statistics, with QEMU's names."""

from __future__ import annotations

import enum
import time
from typing import Any

import attrs

from .errors import ConfigError
from .units import parse_rate

#: The transports a migration can use, by name (``trimig demo --transport``).
TRANSPORT_NAMES = ("unix", "tcp", "exec", "rdma")


class MigrationStatus(enum.Enum):
    """QEMU's MigrationStatus values that trimig uses (the QAPI names)."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_DEVICE = "postcopy-device"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILING = "failing"
    FAILED = "failed"
    DEVICE = "device"

    @property
    def is_postcopy(self) -> bool:
        return self in (
            MigrationStatus.POSTCOPY_DEVICE,
            MigrationStatus.POSTCOPY_ACTIVE,
            MigrationStatus.POSTCOPY_PAUSED,
            MigrationStatus.POSTCOPY_RECOVER_SETUP,
            MigrationStatus.POSTCOPY_RECOVER,
        )

    @property
    def is_running(self) -> bool:
        """True while a migration is under way (not none and not finished)."""
        return self not in (
            MigrationStatus.NONE,
            MigrationStatus.COMPLETED,
            MigrationStatus.FAILED,
            MigrationStatus.CANCELLED,
        )


#: Capabilities trimig understands, in QEMU's QAPI order. Others are refused.
CAPABILITY_NAMES = (
    "auto-converge",
    "events",
    "postcopy-ram",
    "return-path",
    "postcopy-blocktime",
    "postcopy-preempt",
    "dirty-limit",
    "mapped-ram",
    "x-lazy-restore",
)


@attrs.define
class MigrationCapabilities:
    """Boolean capabilities, set with migrate-set-capabilities."""

    events: bool = False
    postcopy_ram: bool = False
    #: On by default, unlike QEMU: the source opens the return path on every transport that
    #: has one (tcp, unix, rdma) and reports ``completed`` only after the destination's
    #: SHUT(0), so a stream the destination refused ends ``failed``. exec has none; there
    #: (or with this off) ``completed`` means the whole stream was written.
    return_path: bool = True
    postcopy_blocktime: bool = False
    postcopy_preempt: bool = False
    #: QEMU 9.0's fixed-offset file layout (file: URIs only; docs/snapshots.md).
    mapped_ram: bool = False
    #: trimig's: an incoming ``file:`` with mapped-ram runs the guest at once and faults its
    #: pages in from the file (userfaultfd), a thread reading the rest (docs/snapshots.md).
    x_lazy_restore: bool = False

    #: Throttle the guest process when precopy does not converge (see savevm/throttle.py).
    auto_converge: bool = False
    #: Limit the guest's dirty rate through the guest protocol (vcpu-dirty-limit).
    dirty_limit: bool = False

    def set(self, name: str, state: bool) -> None:
        if name not in CAPABILITY_NAMES:
            raise ConfigError(
                f"unknown capability {name!r}; trimig supports {', '.join(CAPABILITY_NAMES)}"
            )
        if not isinstance(state, bool):
            raise ConfigError(f"capability {name!r} state must be a boolean")
        setattr(self, name.replace("-", "_"), state)
        if self.postcopy_preempt and not self.postcopy_ram:
            setattr(self, name.replace("-", "_"), not state)
            raise ConfigError("postcopy-preempt requires postcopy-ram")
        if self.auto_converge and self.dirty_limit:
            setattr(self, name.replace("-", "_"), not state)
            raise ConfigError(
                "dirty-limit conflicts with auto-converge, only one of them is available currently"
            )
        if self.mapped_ram and self.postcopy_ram:
            setattr(self, name.replace("-", "_"), not state)
            raise ConfigError("Mapped-ram migration is incompatible with postcopy")
        if self.x_lazy_restore and not self.mapped_ram:
            setattr(self, name.replace("-", "_"), not state)
            raise ConfigError("x-lazy-restore requires mapped-ram")

    def get(self, name: str) -> bool:
        return bool(getattr(self, name.replace("-", "_")))

    def query(self) -> list[dict[str, Any]]:
        return [{"capability": name, "state": self.get(name)} for name in CAPABILITY_NAMES]

    @property
    def wants_return_path(self) -> bool:
        """A return path is used when the transport has one (postcopy-ram requires one)."""
        return self.return_path or self.postcopy_ram


#: QEMU's default max-bandwidth is 128 MiB/s; trimig moves memory on one machine or a fast
#: link, so it defaults to unlimited (0). downtime-limit defaults to 300 ms as in QEMU.
@attrs.define
class MigrationParameters:
    """Numeric parameters, set with migrate-set-parameters (QEMU's names and units)."""

    max_bandwidth: int = 0  # bytes/s, 0 = unlimited
    downtime_limit: int = 300  # ms
    max_postcopy_bandwidth: int = 0  # bytes/s, 0 = unlimited
    avail_switchover_bandwidth: int = 0  # bytes/s, 0 = use the measured bandwidth
    #: Switch to postcopy after this many precopy passes, converging or not (0 = off).
    #: trimig's own parameter; ``trimig demo --postcopy`` sets it to 1.
    x_postcopy_after_passes: int = 0
    #: The automatic policy: switch to postcopy once this many consecutive passes did
    #: not converge (0 = off). trimig's own parameter.
    x_postcopy_auto_passes: int = 0
    #: Dead-peer detection (ms, 0 = off): a channel that moves no byte for this long fails
    #: (precopy: the migration fails; postcopy: both sides pause). Also TCP_USER_TIMEOUT and
    #: the keepalive of tcp channels. trimig's own parameter.
    x_channel_timeout: int = 30_000
    #: Automatic postcopy recovery: after a pause, this many consecutive attempts to
    #: re-establish the channels by themselves (the source reconnects to the same address,
    #: the destination accepts on its listener); 0 = off, as QEMU. trimig's own parameter.
    x_postcopy_auto_recover: int = 0
    #: ms before the first automatic attempt, doubling after each failed one (to 10 s).
    x_postcopy_recover_backoff: int = 500
    #: auto-converge (QEMU's names, defaults and ranges; percentages of the guest's CPU).
    throttle_trigger_threshold: int = 50
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99
    #: dirty-limit: MB/s the guest may dirty (QEMU's vcpu-dirty-limit; per guest here),
    #: and the period in ms over which the limit is checked.
    vcpu_dirty_limit: int = 1
    x_vcpu_dirty_limit_period: int = 1000
    #: TLS: the tls-creds-x509 object's id ("" = plaintext), the host name the
    #: destination's certificate must match ("" = the tcp host) and the authz object the
    #: destination checks the source's certificate subject against ("" = any).
    tls_creds: str = ""
    tls_hostname: str = ""
    tls_authz: str = ""

    _LIMITS = {
        "max-bandwidth": (0, 1 << 50),
        "downtime-limit": (0, 2_000_000),
        "max-postcopy-bandwidth": (0, 1 << 50),
        "avail-switchover-bandwidth": (0, 1 << 50),
        "x-postcopy-after-passes": (0, 1 << 20),
        "x-postcopy-auto-passes": (0, 1 << 20),
        "x-channel-timeout": (0, 86_400_000),
        "x-postcopy-auto-recover": (0, 1 << 20),
        "x-postcopy-recover-backoff": (0, 600_000),
        "throttle-trigger-threshold": (1, 100),
        "cpu-throttle-initial": (1, 99),
        "cpu-throttle-increment": (1, 99),
        "max-cpu-throttle": (1, 99),
        "vcpu-dirty-limit": (1, 1 << 20),
        "x-vcpu-dirty-limit-period": (1, 1000),
    }
    _BOOLEANS = ("cpu-throttle-tailslow",)
    _STRINGS = ("tls-creds", "tls-hostname", "tls-authz")

    def set(self, name: str, value: Any) -> None:
        if name in self._STRINGS:
            if not isinstance(value, str):
                raise ConfigError(f"parameter {name!r} must be a string, got {value!r}")
            setattr(self, name.replace("-", "_"), value)
            return
        if name in self._BOOLEANS:
            if not isinstance(value, bool):
                raise ConfigError(f"parameter {name!r} must be a boolean, got {value!r}")
            setattr(self, name.replace("-", "_"), value)
            return
        if name not in self._LIMITS:
            names = (*self._LIMITS, *self._BOOLEANS, *self._STRINGS)
            raise ConfigError(f"unknown parameter {name!r}; trimig supports {', '.join(names)}")
        if isinstance(value, str):
            value = parse_rate(value, what=name) if "bandwidth" in name else _parse_int(name, value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"parameter {name!r} must be an integer, got {value!r}")
        low, high = self._LIMITS[name]
        if not low <= value <= high:
            raise ConfigError(f"parameter {name!r} must be between {low} and {high}, got {value}")
        setattr(self, name.replace("-", "_"), value)

    def query(self) -> dict[str, Any]:
        names = (*self._LIMITS, *self._BOOLEANS, *self._STRINGS)
        return {name: getattr(self, name.replace("-", "_")) for name in names}

    @property
    def channel_timeout(self) -> float | None:
        """``x-channel-timeout`` in seconds, None when off."""
        return self.x_channel_timeout / 1000 if self.x_channel_timeout else None


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"parameter {name!r} must be an integer, got {text!r}") from None


@attrs.define
class SourceStats:
    """The source's counters; ``query()`` renders them with query-migrate's names."""

    start_ns: int = attrs.field(factory=time.monotonic_ns)
    setup_ns: int = 0
    end_ns: int = 0
    downtime_start_ns: int = 0
    downtime_ns: int = 0
    transferred: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    total: int = 0
    remaining: int = 0
    duplicate: int = 0
    normal: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    dirty_sync_count: int = 0
    postcopy_requests: int = 0
    expected_downtime_ms: int = 0
    bandwidth: float = 0.0  # bytes/s, last measurement
    converging: bool = True
    non_converging_passes: int = 0
    #: Why precopy does not converge (query-migrate's x-not-converging), "" when it does.
    not_converging_reason: str = ""
    #: auto-converge's throttle of the guest (percent) and dirty-limit's figures.
    cpu_throttle_percentage: int = 0
    dirty_limit_active: bool = False
    dirty_limit_unsupported: bool = False
    dirty_limit_throttle_time_per_round: int = 0
    dirty_limit_ring_full_time: int = 0
    error_desc: str = ""

    def total_time_ms(self) -> int:
        end = self.end_ns or time.monotonic_ns()
        return (end - self.start_ns) // 1_000_000

    def query(self, status: MigrationStatus) -> dict[str, Any]:
        info: dict[str, Any] = {"status": status.value}
        if status is MigrationStatus.NONE:
            return info
        info["total-time"] = self.total_time_ms()
        info["setup-time"] = self.setup_ns // 1_000_000
        if status is MigrationStatus.COMPLETED or status.is_postcopy:
            info["downtime"] = self.downtime_ns // 1_000_000
            info["downtime-us"] = self.downtime_ns // 1_000
        else:
            info["expected-downtime"] = self.expected_downtime_ms
        info["ram"] = {
            "transferred": self.transferred,
            "remaining": 0 if status is MigrationStatus.COMPLETED else self.remaining,
            "total": self.total,
            "duplicate": self.duplicate,
            "normal": self.normal,
            "normal-bytes": self.normal * 4096,
            "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": round(self.mbps, 3),
            "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": self.postcopy_requests,
            "page-size": 4096,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": self.postcopy_bytes,
        }
        if not self.converging:
            info["x-not-converging"] = self.not_converging_reason or "not converging"
            info["x-non-converging-passes"] = self.non_converging_passes
        if self.cpu_throttle_percentage:
            info["cpu-throttle-percentage"] = self.cpu_throttle_percentage
        if self.dirty_limit_active:
            info["dirty-limit-throttle-time-per-round"] = self.dirty_limit_throttle_time_per_round
            info["dirty-limit-ring-full-time"] = self.dirty_limit_ring_full_time
        if self.dirty_limit_unsupported:
            info["x-dirty-limit-unsupported"] = True
        if self.error_desc:
            info["error-desc"] = self.error_desc
        return info
