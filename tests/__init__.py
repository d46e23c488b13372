"""The test suite. Its brokers run in-process on the gRPC stack `pushchannel serve` runs on:
gRPC core reads its experiments when `grpc` is first imported, and this package is imported
before any test module or conftest (see pushchannel._grpc_env)."""

import os

from pushchannel._grpc_env import use_fused_filters

#: ``GRPC_EXPERIMENTS`` as the suite was started with (None: not set).
STARTED_WITH_EXPERIMENTS = os.environ.get("GRPC_EXPERIMENTS")
FUSED_FILTERS = use_fused_filters()
