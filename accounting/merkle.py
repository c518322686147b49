"""Merkle tree over (relay, cumulative earned) leaves, with claim proofs. Pure.

Shaped for a merkle-distributor contract: leaves are hashed with a domain
label, inner nodes hash the *sorted* pair of children (so a proof is just the
list of siblings, no left/right flags), an odd node at the end of a level is
carried up unchanged. SHA-256 today; a chain would swap in its own hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from meshvpn.identity import PublicKey

LEAF_LABEL: Final = b"meshvpn/v1/earnings-leaf\x00"
NODE_LABEL: Final = b"meshvpn/v1/earnings-node\x00"


def leaf_hash(relay: PublicKey, cumulative: int) -> bytes:
    if not 0 <= cumulative < 1 << 128:
        raise ValueError("amount out of range")
    return hashlib.sha256(LEAF_LABEL + relay.raw + cumulative.to_bytes(16, "big")).digest()


def node_hash(a: bytes, b: bytes) -> bytes:
    lo, hi = (a, b) if a <= b else (b, a)
    return hashlib.sha256(NODE_LABEL + lo + hi).digest()


@dataclass(frozen=True)
class MerkleTree:
    leaves: tuple[bytes, ...]  # leaf hashes, in a fixed order (sorted by relay key)
    levels: tuple[tuple[bytes, ...], ...]

    @classmethod
    def build(cls, entries: dict[PublicKey, int]) -> MerkleTree:
        leaves = tuple(leaf_hash(k, v) for k, v in sorted(entries.items()))
        levels = [leaves]
        while len(levels[-1]) > 1:
            level = levels[-1]
            up = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                up.append(level[-1])
            levels.append(tuple(up))
        return cls(leaves, tuple(levels))

    @property
    def root(self) -> bytes:
        return self.levels[-1][0] if self.leaves else bytes(32)

    def proof(self, index: int) -> tuple[bytes, ...]:
        siblings = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                siblings.append(level[sibling])
            index //= 2
        return tuple(siblings)


def verify_proof(relay: PublicKey, cumulative: int, proof: tuple[bytes, ...], root: bytes) -> bool:
    node = leaf_hash(relay, cumulative)
    for sibling in proof:
        if len(sibling) != 32:
            return False
        node = node_hash(node, sibling)
    return node == root
