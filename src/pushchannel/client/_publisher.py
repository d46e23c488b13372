"""Publishing with retries that never store a message twice.

Every message carries an id (the caller's, or one the client made up), so a publish whose
answer was lost (a connection cut, a broker restarting, no answer within
``RetryPolicy.attempt_timeout``) is sent again as it was: the broker stores each id once and
answers a repeat with the first seq and ``duplicate = True``. Failures that cannot succeed
(bad input, missing rights, a full channel) raise at once.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time

import grpc
import grpc.aio

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.client._backoff import Backoff, Clock, Random
from pushchannel.client._types import PublishResult, RetryPolicy
from pushchannel.client._wire import Connection, Metadata, cancelled_under_us, retryable, translate
from pushchannel.errors import Cancelled, PushChannelError

log = logging.getLogger("pushchannel.client")


class Publisher:
    """Sends Publish calls over a :class:`Connection`, retrying as its policy says."""

    def __init__(
        self,
        connection: Connection,
        metadata: Metadata,
        policy: RetryPolicy,
        *,
        random: Random = _random.random,
        clock: Clock = time.monotonic,
    ) -> None:
        self._connection = connection
        self._metadata = metadata
        self._policy = policy
        self._random = random
        self._clock = clock

    async def publish(self, request: pb.PublishRequest) -> list[PublishResult]:
        """Store the request's messages (each with an id) atomically; one result each."""
        channel = request.channel
        backoff = Backoff(self._policy, random=self._random, clock=self._clock)
        backoff.begin()
        while True:
            _, broker = self._connection.broker()
            error: PushChannelError
            try:
                response = await broker.publish(
                    request, metadata=self._metadata, timeout=self._policy.attempt_timeout
                )
            except grpc.aio.AioRpcError as e:
                if self._connection.closed:
                    raise RuntimeError("this pushchannel client is closed") from None
                if not retryable(e.code(), publish=True):
                    raise translate(e) from e
                error = translate(e)
            except asyncio.CancelledError:
                # Our channel was closed under the call (replaced as dead, or the client
                # closing), unless it is this task that is being cancelled.
                if not cancelled_under_us():
                    raise
                if self._connection.closed:
                    raise RuntimeError("this pushchannel client is closed") from None
                error = Cancelled("the call was cancelled: its connection was closed")
            else:
                return [PublishResult(r.seq, r.duplicate) for r in response.results]
            delay = backoff.next_delay()
            if delay is None:
                raise type(error)(f"{error} (gave up after {backoff.attempt} attempts)")
            log.warning(
                "publish to %s: %s: %s; retrying in %.2f s (attempt %d)",
                channel,
                error.code,
                error,
                delay,
                backoff.attempt,
            )
            await asyncio.sleep(delay)
