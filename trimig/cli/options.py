"""The argparse pieces the ``trimig`` commands share, and what they mean: the guest
options, the migration options and ``--json``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..migration import MigrationCapabilities, MigrationParameters
from ..units import UNLIMITED, parse_rate, parse_size

if TYPE_CHECKING:
    from ..ram_blocks import RamBlockSpec
    from ..transports.tls_credentials import TlsSettings


def add_json_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_guest_options(parser: argparse.ArgumentParser) -> None:
    """The guest's RAM (``--ram``, ``--huge``) and the built-in guest's workload."""
    parser.add_argument("--ram", default="1G", help="main RAM block size (default 1G)")
    parser.add_argument(
        "--huge",
        default="0",
        help="size of an extra hugetlb (2 MiB pages) RAM block (default none)",
    )
    parser.add_argument(
        "--dirty-rate",
        default="256M",
        help="bytes/s the built-in guest dirties; 'max' for as fast as it can (default 256M)",
    )
    parser.add_argument(
        "--fill", choices=("random", "zero"), default="random", help="initial RAM contents"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the random fill")


def add_warmup_option(parser: argparse.ArgumentParser) -> None:
    """``--warmup``: how long the source guest runs before the migration starts."""
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds the guest runs first")


def add_migration_options(parser: argparse.ArgumentParser) -> None:
    """Bandwidth, downtime, postcopy, and ``--json`` for the final statistics."""
    parser.add_argument("--max-bandwidth", default="0", help="bytes/s, 0 = unlimited (default)")
    parser.add_argument("--downtime-limit", type=int, default=300, help="ms (default 300)")
    parser.add_argument(
        "--postcopy", action="store_true", help="switch to postcopy after the first pass"
    )
    parser.add_argument(
        "--no-preempt",
        action="store_true",
        help="with --postcopy: urgent pages share the main channel (no postcopy-preempt)",
    )
    parser.add_argument(
        "--channel-timeout",
        type=int,
        default=30_000,
        help="ms a channel may move nothing before the peer counts as dead "
        "(x-channel-timeout; 0 = off; default 30000)",
    )
    parser.add_argument(
        "--auto-recover",
        type=int,
        default=10,
        metavar="N",
        help="with --postcopy: after a network break, re-establish the channels by "
        "themselves, up to N failed attempts in a row (x-postcopy-auto-recover; 0 = off, "
        "default 10)",
    )
    add_json_option(parser, "print the result as one JSON object")


def migration_settings(
    args: argparse.Namespace,
) -> tuple[MigrationCapabilities, MigrationParameters]:
    """The capabilities and parameters the migration options ask for."""
    capabilities = MigrationCapabilities()
    parameters = MigrationParameters()
    parameters.set("max-bandwidth", parse_rate(args.max_bandwidth, what="--max-bandwidth"))
    parameters.set("downtime-limit", args.downtime_limit)
    parameters.set("x-channel-timeout", args.channel_timeout)
    if args.postcopy:
        capabilities.set("postcopy-ram", True)
        capabilities.set("postcopy-preempt", not args.no_preempt)
        parameters.set("x-postcopy-after-passes", 1)
        parameters.set("x-postcopy-auto-recover", args.auto_recover)
    return capabilities, parameters


def guest_setup(args: argparse.Namespace) -> tuple[list[RamBlockSpec], list[str]]:
    """The RAM layout (``--ram``, ``--huge``) and the guest command: the words after ``--``,
    or the built-in workload with ``--dirty-rate``, ``--fill`` and ``--seed``."""
    # Imported here: the guest handle and the blocks are the engine's, which control
    # commands such as `trimig ctl` do not load.
    from ..guest.host import workload_command
    from ..ram_blocks import default_block_specs

    specs = default_block_specs(
        parse_size(args.ram, what="--ram"), huge=parse_size(args.huge, what="--huge")
    )
    command = list(getattr(args, "guest_command", None) or []) or workload_command(
        dirty_rate=_dirty_rate(args.dirty_rate), fill=args.fill, seed=args.seed
    )
    return specs, command


def _dirty_rate(text: str) -> int:
    """``--dirty-rate``: bytes/s, 0 for 'max'. A rate of zero is refused rather than read
    as 'max' (the workload's own 0): the built-in guest has no idle mode."""
    rate = parse_rate(text, what="--dirty-rate")
    if rate == 0 and text.strip().lower() not in UNLIMITED:
        raise ConfigError(
            f"--dirty-rate {text!r}: the built-in guest always dirties its memory; give a "
            "rate (4K is one page a second) or 'max' for as fast as it can"
        )
    return rate


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """``--tls-creds DIR`` (QEMU's tls-creds-x509 files) and ``--tls-hostname``."""
    parser.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="encrypt and authenticate every channel with TLS, with QEMU's tls-creds-x509 "
        "files in DIR (ca-cert.pem, server-cert.pem/server-key.pem on the destination, "
        "client-cert.pem/client-key.pem on the source)",
    )
    parser.add_argument(
        "--tls-hostname",
        default="",
        help="host name the destination's certificate must be valid for (default: the tcp "
        "host of the URI; needed for unix:)",
    )


def tls_settings(args: argparse.Namespace, endpoint: str) -> TlsSettings | None:
    """The TLS settings of ``--tls-creds`` for this side (``client`` on the source,
    ``server`` on the destination), or None without it."""
    if not getattr(args, "tls_creds", None):
        return None
    from ..transports.tls_credentials import TlsCredentials, TlsSettings

    credentials = TlsCredentials("tls0", args.tls_creds, endpoint=endpoint)
    return TlsSettings(credentials, hostname=args.tls_hostname)
