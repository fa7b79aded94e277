"""``P/live``, the etcd store's commit point: which version is live, how to fetch and verify it, what comes next."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Pointer:
    """What ``P/live`` said at ``mod_revision`` (0: never written, version 0)."""

    version: int = 0
    sha256: str = ""
    seq: int = 0
    next: int = 1
    commit_id: str = ""
    mod_revision: int = 0
    size: int = 0
    chunks: int = 0
    #: when the commit that wrote this pointer was made (seconds since the epoch; 0: not recorded)
    time: float = 0.0

    @classmethod
    def parse(cls, raw: bytes | None, mod_revision: int) -> Pointer:
        if raw is None:
            return cls()
        data = json.loads(raw)
        return cls(int(data["version"]), str(data["sha256"]), int(data["seq"]), int(data["next"]),
                   str(data.get("commit_id", "")), mod_revision, int(data.get("size", 0)), int(data.get("chunks", 0)),
                   float(data.get("time", 0.0)))

    def record(self) -> bytes:
        fields = {"version": self.version, "sha256": self.sha256, "seq": self.seq, "next": self.next,
                  "commit_id": self.commit_id, "size": self.size, "chunks": self.chunks,
                  "time": self.time}
        return json.dumps(fields, sort_keys=True).encode()
