"""A client over several servers: stable assignment of streams, failover when a server dies.

The hashing and the retry order are checked on their own; then two real `expvault serve`
processes over one root take four writers and a follower, one is killed with `kill -9` mid-write,
and every acknowledged step must be present exactly once and in order.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import BATCH, Actor, ServerProcess, ServerThread, assert_experience, structure
from expvault import InvalidArgumentError, RemoteVault, StorageError, VaultReader
from expvault._rpc import Failover, parse_targets, preference

SERVERS = ("10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051")


# -- the assignment ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vault_name", "vault_uid", "order"),
    [
        ("v", "actor-0", (2, 0, 1)),
        ("v", "actor-1", (0, 2, 1)),
        ("v", "actor-2", (1, 2, 0)),
        ("v", "actor-3", (2, 1, 0)),
        ("pong", "20261125-a", (1, 0, 2)),
        ("v", "", (1, 2, 0)),
    ],
)
def test_preference_is_the_same_in_every_process(
    vault_name: str, vault_uid: str, order: tuple[int, ...]
) -> None:
    # Fixed expectations: a salted hash (Python's hash()) would differ from run to run.
    want = [SERVERS[i] for i in order]
    assert preference(SERVERS, vault_name, vault_uid) == want
    for servers in itertools.permutations(SERVERS):  # the order they are listed in is moot
        assert preference(servers, vault_name, vault_uid) == want


@pytest.mark.parametrize("num_servers", [2, 3])
def test_preference_spreads_streams_evenly(num_servers: int) -> None:
    servers = SERVERS[:num_servers]
    first = Counter(preference(servers, "v", f"actor-{i}")[0] for i in range(1000))
    assert set(first) == set(servers)
    share = 1000 / num_servers
    assert all(abs(n - share) < 0.15 * share for n in first.values()), first


def test_removing_a_server_moves_only_its_streams() -> None:
    uids = [f"actor-{i}" for i in range(300)]
    before = {uid: preference(SERVERS, "v", uid) for uid in uids}
    after = {uid: preference(SERVERS[:2], "v", uid)[0] for uid in uids}
    for uid in uids:
        # A stream of a remaining server stays; one of the removed server goes to its second.
        want = before[uid][0] if before[uid][0] != SERVERS[2] else before[uid][1]
        assert after[uid] == want


def test_target_lists_are_parsed_strictly() -> None:
    assert parse_targets("h:1") == ("h:1",)
    assert parse_targets("h:1, g:2") == ("h:1", "g:2")
    for bad in ["", "h:1,", ",h:1", "h:1,,g:2"]:
        with pytest.raises(InvalidArgumentError, match="empty entries"):
            parse_targets(bad)
    with pytest.raises(InvalidArgumentError, match="more than once"):
        parse_targets("h:1,g:2,h:1")


def test_failover_walks_the_order_then_backs_off_and_never_flaps() -> None:
    failover = Failover(["a", "b", "c"], timeout_s=5.0)
    assert failover.target == "a"
    assert failover.next_delay() == 0.0  # a unreachable: b at once
    assert failover.target == "b"
    assert failover.next_delay() == 0.0
    assert failover.target == "c"
    delay = failover.next_delay()  # a whole round failed: wait, then the first again
    assert delay is not None
    assert delay > 0
    assert failover.target == "a"
    failover.next_delay()
    failover.answered()  # b serves: it stays b while it serves
    assert failover.target == "b"
    delay = failover.next_delay()  # b's stream broke: back to the first after a delay
    assert delay is not None
    assert delay > 0
    assert failover.target == "a"


def test_failover_gives_up_after_its_timeout() -> None:
    failover = Failover(["a", "b"], timeout_s=0.05)
    time.sleep(0.06)
    assert failover.next_delay() is None
    single = Failover(["a"], timeout_s=0.05)
    assert single.next_delay() is not None  # one server: `Backoff` alone
    time.sleep(0.06)
    assert single.next_delay() is None


def test_a_bad_target_list_is_refused_before_connecting() -> None:
    with pytest.raises(InvalidArgumentError, match="more than once"):
        RemoteVault("127.0.0.1:1,127.0.0.1:1", "v", structure())
    with pytest.raises(InvalidArgumentError, match="empty entries"):
        VaultReader("127.0.0.1:1,", "v")


# -- two servers, one killed -------------------------------------------------------------------


class _Writer:
    """A thread stepping an actor and writing each delta until told to stop."""

    def __init__(self, target: str, uid: str, *, wait: bool) -> None:
        self.actor = Actor()
        self.vault = RemoteVault(target, "v", structure(), vault_uid=uid, reconnect_timeout_s=30)
        self.wait = wait
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"writer-{uid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.vault.write(self.actor.add(3), wait=self.wait)
                time.sleep(0.005)
            self.vault.close()
        except BaseException as error:
            self.error = error

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive()


class _Follower:
    """A thread following one stream, checking every item against `experience`."""

    def __init__(self, target: str, uid: str) -> None:
        self.reader = VaultReader(target, "v", structure(), vault_uid=uid, reconnect_timeout_s=30)
        self.position = 0
        self.error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"follow-{uid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self.reader.follow():
                assert item.start == self.position  # each step once, in order
                assert_experience(item.experience, item.start, item.stop)
                self.position = item.stop
        except BaseException as error:
            if not self._closing:
                self.error = error

    def close(self) -> None:
        self._closing = True
        self.reader.close()
        self._thread.join(30)


def _until(what: str, predicate: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def _read_when_seen(reader: VaultReader, uid: str, stop: int, timeout_s: float = 5) -> Any:
    """Steps `[0, stop)` of a stream another server writes, once the reading server saw them.

    A server polls the store for streams it does not write (about every 0.2 s), so steps just
    acknowledged elsewhere may not be readable there yet.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return reader.read(stop=stop, vault_uid=uid)
        except InvalidArgumentError:  # "past the committed steps": not seen yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _preferring(
    server: str, servers: tuple[str, ...], count: int = 2, *, vault_name: str = "v"
) -> list[str]:
    """The first `count` stream names `actor-N` of `vault_name` whose first choice is `server`."""
    names = (f"actor-{i}" for i in itertools.count())
    chosen = (u for u in names if preference(servers, vault_name, u)[0] == server)
    return list(itertools.islice(chosen, count))


def _vault_preferring(server: str, servers: tuple[str, ...]) -> str:
    """The first vault name `vN` whose calls about the whole vault go to `server` first."""
    names = (f"v{i}" for i in itertools.count())
    return next(n for n in names if preference(servers, n)[0] == server)


def _attached(server: ServerProcess, uid: str) -> bool:
    """Whether `server` logged a writer of stream `v/uid` attaching (its INFO log line)."""
    return f"attached to v/{uid} " in server.log


def test_writers_fail_over_when_a_server_is_killed(
    spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    root = tmp_path / "vaults"
    a, b = spawn_server(root), spawn_server(root)
    target = f"{a.target},{b.target}"
    # Two streams that prefer each server (ports differ from run to run, so pick by the hash).
    on_a, on_b = (
        _preferring(a.target, (a.target, b.target)),
        _preferring(b.target, (a.target, b.target)),
    )
    writers: dict[str, _Writer] = {}
    for uid, wait in [(on_a[0], True), (on_a[1], False), (on_b[0], True), (on_b[1], False)]:
        writers[uid] = _Writer(target, uid, wait=wait)
        assert writers[uid].vault.servers[0] == (a.target if uid in on_a else b.target)
    follower = _Follower(target, on_a[0])  # follows on a, the writer's server, until a dies
    try:
        _until(
            "40 steps per stream",
            lambda: all(w.vault.committed_index >= 40 for w in writers.values()),
        )
        # Spread: each server is the writer of the streams that prefer it, and of no other.
        for uid in on_a:
            assert _attached(a, uid)
            assert not _attached(b, uid)
        for uid in on_b:
            assert _attached(b, uid)
            assert not _attached(a, uid)
        before = {uid: w.vault.committed_index for uid, w in writers.items()}
        # Needs the refresh of streams another server writes (issue 8): b serves what a wrote.
        with VaultReader(b.target, "v", structure()) as reader:
            for uid in on_a:
                assert_experience(_read_when_seen(reader, uid, before[uid]), 0, before[uid])
        # Counted at the kill (the reads above take a while, during which a acknowledged more).
        at_kill = {uid: w.vault.committed_index for uid, w in writers.items()}
        a.kill()  # mid-write: every writer is between writes or waiting for acks
        _until(
            "40 more steps per stream after the kill",
            lambda: all(w.vault.committed_index >= at_kill[u] + 40 for u, w in writers.items()),
        )
        for uid in on_a:
            assert _attached(b, uid)  # failed over to b
        # a comes back at its address: the streams stay on b while b serves them (no flapping).
        a = spawn_server(root, a.port)
        after = {uid: w.vault.committed_index for uid, w in writers.items()}
        _until(
            "20 more steps per stream after a's return",
            lambda: all(w.vault.committed_index >= after[u] + 20 for u, w in writers.items()),
        )
        assert not any(_attached(a, uid) for uid in writers)
        for writer in writers.values():
            writer.stop.set()
        for writer in writers.values():
            writer.join()
            assert writer.error is None  # the caller never saw the outage
        lengths = {uid: w.actor.steps for uid, w in writers.items()}
        _until(
            "the follower to catch up",
            lambda: follower.position == lengths[on_a[0]] or follower.error is not None,
        )
        assert follower.error is None
    finally:
        follower.close()
        for writer in writers.values():
            writer.stop.set()
    # Everything acknowledged is there once, in order: read through b, the last writer of all.
    with VaultReader(b.target, "v", structure()) as reader:
        assert reader.streams() == lengths
        for uid, length in lengths.items():
            assert_experience(reader.read(vault_uid=uid), 0, length)
    # And through a fresh server process, that opens every stream from the store.
    a.kill()
    fresh = spawn_server(root)
    with VaultReader(f"{a.target},{fresh.target}", "v", structure()) as reader:
        assert reader.streams() == lengths
        for uid, length in lengths.items():
            assert_experience(reader.read(vault_uid=uid), 0, length)


# -- servers that do not answer ------------------------------------------------------------------


class _Relay:
    """A TCP relay in front of a server, to cut clients off while the server lives on.

    `cut()` resets the client side of every connection and stops listening (new connections are
    refused) but keeps the server side open: to the server the client is still there, so it
    keeps the stream's writer lock, as across a network partition. `heal()` closes the server
    side too.
    """

    def __init__(self, server: str) -> None:
        host, port = server.rsplit(":", 1)
        self._server = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._clients: list[socket.socket] = []
        self._servers: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self._server)
            self._clients.append(client)
            self._servers.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            return

    def cut(self) -> None:
        with contextlib.suppress(OSError):  # cut already
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone would not
        self._listener.close()
        for client in self._clients:
            with contextlib.suppress(OSError):
                linger = struct.pack("ii", 1, 0)  # close with a reset, at once
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            client.close()

    def heal(self) -> None:
        for upstream in self._servers:
            with contextlib.suppress(OSError):  # healed already
                upstream.shutdown(socket.SHUT_RDWR)  # wakes the relay's recv(), tells the server
            upstream.close()

    def close(self) -> None:
        self.cut()
        self.heal()


def _gave_up(server: ServerProcess, uid: str) -> bool:
    return f"v/{uid}: no writer attached; gave up" in server.log


def test_a_busy_stream_after_failover_is_retried_until_the_old_server_gives_it_up(
    spawn_server: Callable[..., ServerProcess],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="expvault._sender")
    root = tmp_path / "vaults"
    # a gives a stream up 2 s after its last writer detached (--writer-idle-s).
    a, b = spawn_server(root, 0, "--writer-idle-s", "2"), spawn_server(root)
    relay = _Relay(a.target)
    servers = (relay.target, b.target)
    (uid,) = _preferring(relay.target, servers, 1)
    actor = Actor()
    with (
        contextlib.closing(relay),
        RemoteVault(",".join(servers), "v", structure(), vault_uid=uid) as vault,
    ):
        vault.write(actor.add(5))
        assert _attached(a, uid)
        relay.cut()  # a lives on and still holds the stream: b must refuse it as busy, for now
        outcome: list[BaseException | int] = []

        def write() -> None:
            try:
                outcome.append(vault.write(actor.add(4)))
            except BaseException as error:
                outcome.append(error)

        writing = threading.Thread(target=write, daemon=True)
        writing.start()
        _until(
            "b to refuse the busy stream",
            lambda: any("FAILED_PRECONDITION" in r.getMessage() for r in caplog.records),
        )
        assert writing.is_alive()  # still retrying, not failed
        assert outcome == []
        # a learns its client is gone (here at once; across a real partition from its
        # keepalive pings, within about 40 s), gives the stream up once idle, and b takes it,
        # while a stays alive and unreachable.
        relay.heal()
        writing.join(30)
        assert outcome == [4]
        assert a.process.poll() is None
        _until("a to log that it gave the stream up", lambda: _gave_up(a, uid))
        assert vault.flush() == 9
        assert _attached(b, uid)
    with VaultReader(b.target, "v", structure()) as reader:
        assert reader.streams() == {uid: 9}
        assert_experience(reader.read(vault_uid=uid), 0, 9)


def test_a_server_that_never_answers_is_left_for_the_next(server: ServerThread) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never speaks
    try:
        servers = (f"127.0.0.1:{silent.getsockname()[1]}", server.target)
        name = _vault_preferring(servers[0], servers)
        (uid,) = _preferring(servers[0], servers, 1, vault_name=name)
        actor = Actor()
        # CreateVault gives up on it after timeout_s, the writer's open too; both move on.
        target = ",".join(servers)
        with RemoteVault(target, name, structure(), vault_uid=uid, timeout_s=1) as vault:
            assert vault.servers[0] == servers[0]
            vault.write(actor.add(6))
            assert vault.flush() == 6
        with VaultReader(server.target, name, structure()) as reader:
            assert_experience(reader.read(vault_uid=uid), 0, 6)
    finally:
        silent.close()


def test_servers_that_do_not_share_a_root_are_refused_after_failover(
    make_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    x, y = make_server(root=tmp_path / "x"), make_server(root=tmp_path / "y")
    for server in (x, y):  # the vault on both, its streams on one
        RemoteVault(server.target, "v", structure(), vault_uid="other").close()
    servers = (x.target, y.target)
    (uid,) = _preferring(x.target, servers, 1)
    actor = Actor()
    vault = RemoteVault(",".join(servers), "v", structure(), vault_uid=uid)
    vault.write(actor.add(5))
    x.stop()
    # y has none of the 5 acknowledged steps: resending from there would leave a gap.
    with pytest.raises(StorageError, match="must serve the same root"):
        vault.write(actor.add(2))
    with pytest.raises(StorageError):  # final: every later call raises it
        vault.flush()
    vault.close()  # raised already: not again


def test_readers_move_on_from_a_server_that_is_down(server: ServerThread) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:  # a port nothing listens on after
        down = f"127.0.0.1:{closed.getsockname()[1]}"
    servers = (down, server.target)
    name = _vault_preferring(down, servers)  # every call below goes to `down` first
    uids = _preferring(down, servers, 2, vault_name=name)
    target = ",".join(servers)
    for uid in uids:
        actor = Actor()
        with RemoteVault(target, name, structure(), vault_uid=uid) as vault:
            assert vault.servers == list(servers)
            vault.write(actor.add(8))
    with VaultReader(target, name, structure()) as reader:
        assert reader.streams() == dict.fromkeys(uids, 8)
        assert_experience(reader.read(vault_uid=uids[0]), 0, 8)
        assert reader.read_vault().experience.obs.shape[:2] == (2 * BATCH, 8)
        with reader.follow(vault_uid=uids[1], start=3) as follow:
            item = next(follow)
            assert_experience(item.experience, 3, item.stop)
        batch = reader.sample(4, 3, seed=0)
        assert batch.experience.obs.shape[:2] == (4, 3)
