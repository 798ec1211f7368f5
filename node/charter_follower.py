"""The network charter a node follows (protocol/charter.py).

A node started with ``--network`` has a genesis, given by its user as a file or found
over the DHT by its id. Every ``poll`` seconds it reads the ``record/charter`` records
under the network's key and :func:`charter.follow`\\ s the highest valid version; it
keeps every version it followed in ``HOME/charter.json`` (so a restart starts where it
was) and republishes them with its other records, so that a node joining later can
follow from the genesis. A node without ``--network`` follows none and runs a private
test network: any key may propose, commit and attest (docs/charters.md).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hivemerge.node.storage.home import CHARTER_FILE, read_json, write_json
from hivemerge.protocol import charter as charters
from hivemerge.protocol.content import is_content_id
from hivemerge.protocol.errors import UserInputError

FIND_TIMEOUT = 60.0  # how long `node start --network ID` looks for the genesis on the DHT


class CharterFollower:
    def __init__(self, node, network: dict | str):
        self.node = node
        saved = read_json(node.home / CHARTER_FILE, None)
        if isinstance(network, dict):
            genesis = charters.check_charter(network)
            if genesis["charter"]["version"] != 0 or not charters.genesis_ok(genesis):
                raise UserInputError("--network: the charter given must be a genesis (version 0) signed by "
                                     f"{genesis['charter']['threshold']} of its maintainers")
            self.genesis_id = charters.charter_id(genesis["charter"])
            self.chain = [genesis]
        elif isinstance(network, str) and is_content_id(network):
            self.genesis_id, self.chain = network, []
        else:
            raise UserInputError(f"--network: {network!r} is neither a charter file nor a charter id")
        if isinstance(saved, list) and saved:
            self.chain = self._valid_chain(saved) or self.chain  # where it was before a restart (checked again)

    @property
    def current(self) -> dict | None:
        return self.chain[-1] if self.chain else None

    def _valid_chain(self, saved: list) -> list[dict]:
        """The saved versions that still chain from this network's genesis ([] if the file
        is of another network; a file that fails the schema names itself)."""
        try:
            chain = [charters.check_charter(saved[0])]
        except UserInputError as exc:
            raise UserInputError(f"{self.node.home / CHARTER_FILE}: {exc}; repair or remove it") from None
        if charters.charter_id(chain[0]["charter"]) != self.genesis_id:
            return []
        if not charters.genesis_ok(chain[0]):
            raise UserInputError(f"{self.node.home / CHARTER_FILE}: its genesis is not signed by enough maintainers")
        for version in saved[1:]:
            if not charters.successor_ok(chain[-1], version):
                break
            chain.append(version)
        return chain

    # -- on the node's loop -------------------------------------------------------------------
    async def find_genesis(self, timeout: float = FIND_TIMEOUT) -> None:
        """For ``--network ID``: the genesis from the DHT (k of its maintainers signed it)."""
        ends = time.monotonic() + timeout
        while not self.chain:
            found = charters.find_genesis(self.genesis_id, await self._candidates())
            if found is not None:
                self.chain = [found]
                self._save()
                return
            if time.monotonic() > ends:
                raise UserInputError(f"--network {self.genesis_id[:12]}: no genesis charter with that id found on the "
                                     f"network within {timeout:g} s (give the charter file instead)")
            await asyncio.sleep(2.0)

    async def refresh(self) -> None:
        """Follow the highest valid version the DHT holds (never back)."""
        candidates = await self._candidates()
        loop = asyncio.get_running_loop()
        target = await loop.run_in_executor(None, charters.follow, self.current, candidates)  # seconds on a flooded key
        documents = {charters.charter_id(c["charter"]): c["charter"] for c in candidates}
        path, cid, here = [], charters.charter_id(target["charter"]), charters.charter_id(self.current["charter"])
        while cid != here:  # the versions between, each kept (with the signatures that counted) to republish
            path.append(cid)
            cid = documents[cid]["previous"]
        for cid in reversed(path):
            step = charters.follow(self.current, [c for c in candidates if charters.charter_id(c["charter"]) == cid])
            self.chain.append(step)
            self.node.log(f"network {step['charter']['name']}: charter version {step['charter']['version']} ({cid[:12]}) followed")
        if path:
            self._save()

    async def announce(self) -> None:
        for version in self.chain:
            fields = charters.record_fields(version, self.genesis_id, self.node.clock())
            await self.node.store_record("record/charter", charters.charters_key(self.genesis_id), fields, self.node.record_ttl)

    async def publish(self, signed: Any) -> dict:
        """Store a charter version (a maintainer's copy of an update, signed by some) and follow."""
        signed = charters.check_charter(signed)
        previous = signed["charter"]["previous"]
        known = {charters.charter_id(v["charter"]) for v in self.chain}
        if charters.charter_id(signed["charter"]) != self.genesis_id and previous not in known:
            raise UserInputError("the charter is not a version of this node's network (its previous version is unknown here)")
        fields = charters.record_fields(signed, self.genesis_id, self.node.clock())
        await self.node.store_record("record/charter", charters.charters_key(self.genesis_id), fields, self.node.record_ttl)
        await self.refresh()
        cid = charters.charter_id(signed["charter"])
        adopted = any(charters.charter_id(v["charter"]) == cid for v in self.chain)
        answer = {"adopted": adopted, "id": cid, "version": signed["charter"]["version"]}
        if not adopted:
            answer["reason"] = (f"not a valid next version of version {self.current['charter']['version']} "
                                f"({self.current['charter']['threshold']} of its maintainers must sign it)")
        return answer

    async def _candidates(self) -> list[dict]:
        found = await self.node.network.get_records(charters.charters_key(self.genesis_id))
        return [r["charter"] for r in found.values()]

    def _save(self) -> None:
        write_json(self.node.home / CHARTER_FILE, self.chain)

    def status(self) -> dict:
        current = self.current
        return {"genesis_id": self.genesis_id, "charter": current,
                "id": charters.charter_id(current["charter"]) if current else None,
                "version": current["charter"]["version"] if current else None}
