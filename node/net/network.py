"""The node's presence on the network: a libp2p daemon and a DHT node on one loop.

The node's Ed25519 identity is also its libp2p identity, so its peer id is derived
from the same public key that signs its records. The DHT runs in-process
(``DHTNode``) rather than as hivemind's DHT subprocess: no pipe between processes
(whose large messages can wedge it), nothing to pickle, no orphan on a hard kill.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from hivemind.dht import DHTNode
from hivemind.dht.crypto import RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer

from hivemerge.merge.io.atomic import write_file_atomic
from hivemerge.node.net.dht_storage import BoundedRecordStorage
from hivemerge.node.net.loop import LoopThread
from hivemerge.protocol import records
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity, check_private_file

# p2pd shares ports silently with SO_REUSEPORT; a clash must be an error instead.
os.environ.setdefault("LIBP2P_TCP_REUSEPORT", "false")
P2P_KEY_FILE = "p2p.key"
DHT_TIMEOUT = 15.0


def write_p2p_key(identity: Identity, home: Path) -> Path:
    """The identity in libp2p's key format (what p2pd reads), mode 0600. It is the same
    private key as identity.key, so the same rule holds: one that others can read is
    refused, not silently tightened (it may have leaked already)."""
    path = home / P2P_KEY_FILE
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=identity.private_bytes() + identity.public_key).SerializeToString()
    if path.exists():
        check_private_file(path)
    if not path.exists() or path.read_bytes() != data:
        write_file_atomic(path, data, mode=0o600)
    return path


def peer_id_of(public_key: bytes) -> PeerID:
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.Ed25519, data=public_key).SerializeToString()
    return PeerID(b"\x00" + bytes([len(encoded)]) + encoded)  # identity multihash


def is_bound(record: dict) -> bool:
    """A record that names a peer to contact (expert, pack, provider) counts only if that
    libp2p peer id is the one its signing key derives: nobody can point others at a peer
    that is not theirs."""
    try:
        return str(peer_id_of(bytes.fromhex(record["publisher"]))) == record["peer_id"]
    except (ValueError, KeyError):
        return False


class SignedRecordValidator(RecordValidatorBase):
    """Accepts a DHT record only if it is a record of :mod:`hivemerge.protocol.records`
    signed by the owner its subkey names. Every node runs it on every store it receives
    and on every lookup reply, so a forged record is dropped wherever it shows up."""

    def validate(self, record) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            return False
        return isinstance(subkey, str) and records.is_valid_signed_value(subkey, value, record.expiration_time)

    def sign_value(self, record) -> bytes:
        return record.value  # the value is signed already (a signed manifest)

    def strip_value(self, record) -> bytes:
        return record.value

    @property
    def priority(self) -> int:
        return 10

    def merge_with(self, other: Any) -> bool:
        return isinstance(other, SignedRecordValidator)


class Network:
    def __init__(self, identity: Identity, home: Path, listen: list[str], peers: list[str], client_mode: bool = False):
        self.identity = identity
        self.loop = LoopThread()
        self.p2p: P2P | None = None
        self.dht: DHTNode | None = None
        key_path = write_p2p_key(identity, home)
        try:
            self.loop.run(self._start(key_path, listen, peers, client_mode), timeout=60)
        except Exception as exc:
            self.close()
            if "bootstrap" in str(exc) or "failed to connect" in str(exc):
                raise UserInputError(f"cannot reach any of the peers {peers}: {exc}") from None
            raise

    async def _start(self, key_path: Path, listen: list[str], peers: list[str], client_mode: bool) -> None:
        self.p2p = await P2P.create(
            host_maddrs=listen, initial_peers=peers or None, identity_path=str(key_path), check_if_identity_free=False
        )
        self.dht = await DHTNode.create(
            p2p=self.p2p, initial_peers=peers or None, record_validator=SignedRecordValidator(), client_mode=client_mode
        )
        # What others can make this node store or cache is bounded, newest record first (node/net/dht_storage.py).
        protocol = self.dht.protocol
        protocol.storage, protocol.cache = BoundedRecordStorage(), BoundedRecordStorage()

    @property
    def peer_id(self) -> PeerID:
        return self.p2p.peer_id

    def maddrs(self) -> list[str]:
        return [str(m) for m in self.loop.run(self.p2p.get_visible_maddrs(), timeout=10)]

    # -- records ----------------------------------------------------------------------
    async def store_record(self, key: str, subkey: str, value: bytes, expires_at: float) -> bool:
        return await self.dht.store(key, value, expires_at, subkey=subkey)

    async def get_records(self, key: str) -> dict[str, dict]:
        """Valid records under ``key``, by subkey (checked again here: never trust the relay)."""
        found = await self.dht.get(key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        result = {}
        for subkey, item in found.value.items():
            try:
                result[subkey] = records.open_record(key, subkey, item.value)
            except UserInputError:
                continue
        return result

    def daemon_alive(self) -> bool:
        child = getattr(self.p2p, "_child", None)
        return child is not None and child.returncode is None

    def daemon_exit_status(self) -> int | None:
        child = getattr(self.p2p, "_child", None)
        return None if child is None else child.returncode

    def close(self) -> None:
        async def stop() -> None:
            try:
                # DHTNode.shutdown unregisters its handlers through p2pd, with no timeout of
                # its own: if the daemon died (killed, crashed) it would wait forever.
                if self.dht is not None and self.daemon_alive():
                    await asyncio.wait_for(self.dht.shutdown(), 5)
            except Exception:
                pass  # the daemon goes below either way
            finally:
                if self.p2p is not None:
                    await self.p2p.shutdown()

        try:
            if self.p2p is not None or self.dht is not None:
                self.loop.run(stop(), timeout=20)
        finally:
            self.loop.stop()
