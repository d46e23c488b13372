"""Frozen, validated configuration objects, built once and passed down. Nothing here reads files
or the environment at import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pushchannel.core.model import ChannelPolicy, PolicyRule


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits for bad input (SPEC §8)."""

    max_channel_bytes: int = 255
    max_payload: int = 1 << 20
    max_attributes: int = 64
    max_attribute_key: int = 256
    max_attribute_value: int = 4096
    max_batch: int = 1000
    max_id_bytes: int = 256
    max_in_flight: int = 10_000
    max_ack_deadline: float = 3600.0 * 12
    max_ttl: float = 3600.0 * 24 * 365

    def __post_init__(self) -> None:
        for name in ("max_channel_bytes", "max_payload", "max_batch", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be at least 1")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything the broker core needs; the server builds it from flags and file."""

    limits: Limits = field(default_factory=Limits)
    default_policy: ChannelPolicy = field(default_factory=ChannelPolicy)
    policies: tuple[PolicyRule, ...] = ()  # first match wins
    max_delivery_attempts: int = 10
    default_ack_deadline: float = 30.0
    default_max_in_flight: int = 100
    heartbeat_interval: float = 15.0
    seed_max_in_flight: int = 100
    retention_interval: float = 1.0  # how often channels with activity are trimmed
    max_dispatch_batch: int = 1000

    def __post_init__(self) -> None:
        if self.max_delivery_attempts < 1:
            raise ValueError("max_delivery_attempts must be at least 1")
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        if not 0 < self.default_ack_deadline <= self.limits.max_ack_deadline:
            raise ValueError("default_ack_deadline is out of range")

    def policy_for(self, channel: str) -> ChannelPolicy:
        for rule in self.policies:
            if rule.matches(channel):
                return rule.policy
        return self.default_policy


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What ``pushchannel serve`` runs: built once from the config file and flags."""

    listen: str = "127.0.0.1:50051"
    store_url: str = "sqlite:///pushchannel-data/pushchannel.db"
    fsync: Literal["normal", "full"] = "normal"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    grace: float = 10.0
    keepalive_time: float = 20.0
    keepalive_timeout: float = 10.0
    metrics_listen: str | None = None  # HOST:PORT of the Prometheus endpoint; None: off
    log_format: Literal["text", "json"] = "text"
    # Security (docs/security.md): TLS files, the --auth file, and the per-connection limits.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients must present a certificate it signed
    auth_file: str | None = None
    insecure: bool = False  # serve without authentication on a non-loopback address
    max_concurrent_streams: int = 1000  # per connection (HTTP/2 SETTINGS)
    max_metadata_size: int = 16 << 10  # bytes of request headers per call

    def __post_init__(self) -> None:
        if self.fsync not in ("normal", "full"):
            raise ValueError("fsync must be 'normal' or 'full'")
        if self.grace < 0:
            raise ValueError("grace must not be negative")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"listen address {self.listen!r} is not HOST:PORT")
        if self.metrics_listen is not None:
            host, sep, port = self.metrics_listen.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"metrics_listen address {self.metrics_listen!r} is not HOST:PORT")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("mutual TLS (--tls-client-ca) needs TLS: give --tls-cert and --tls-key")
        if self.max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be at least 1")
        if self.max_metadata_size < 1024:
            raise ValueError("max_metadata_size must be at least 1024 bytes")
