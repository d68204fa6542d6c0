"""Many ZooKeeper reads in one request (``multiRead``, opcode 22, ZooKeeper 3.6+), which kazoo
2.11 has no API for.

Reading a set of nodes (a node's index for the agent's reconcile; the followed services for a
snapshot) lists directories, then reads every node they hold. One request per path made a
10-instance host's reconcile 21 requests (the index root, a listing per service, a read per
instance), every resync on every host of the fleet, and all of them within a few seconds after
an ensemble restart. :class:`ManyReads` sends each level as one ``multiRead`` of at most
:data:`MAX_OPS` paths: 3 requests for that reconcile. Each read in it succeeds or fails on its
own (a transaction's all-or-nothing does not apply to reads): a node that is gone is left out,
as one missing between a listing and a read always was. A node whose ACL denies us READ
(anyone may create one in a world-writable service directory) is left out too, as a record
that cannot be decoded is (:meth:`~discovery.registry.decoder.Decoder.denied`): one such node
must not fail every read of the catalog. So is a directory whose listing is refused while
others were listed; when every listing is refused, ``NoAuthError`` is raised (our
credentials: the caller says to give them).

A server older than 3.6 answers ``UNIMPLEMENTED``: logged once, and from then on one request
per path (pipelined), as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from kazoo.exceptions import EXCEPTIONS, NoAuthError, NoNodeError, UnimplementedError
from kazoo.protocol.serialization import (
    GetChildren,
    GetData,
    MultiHeader,
    ZnodeStat,
    int_struct,
    multiheader_struct,
    read_buffer,
    read_string,
    stat_struct,
)

from discovery.registry.decoder import Decoder

log = logging.getLogger(__name__)

#: paths per multiRead (instance records of ~0.4 KB: answers well below jute.maxbuffer, 1 MB)
MAX_OPS = 200
_ERROR = -1  # OpCode.error: the answer of one read that failed


class MultiRead:
    """ZooKeeper's ``multiRead``: ``GetData`` and ``GetChildren`` reads (no watch), one answer
    each, in order: ``(data, stat)``, a list of names, or the exception of that read."""

    type = 22

    def __init__(self, ops: Sequence[GetData | GetChildren]) -> None:
        self.ops = ops

    def __repr__(self) -> str:
        return f"MultiRead({len(self.ops)} reads)"

    def serialize(self) -> bytearray:
        out = bytearray()
        for op in self.ops:
            out += MultiHeader(op.type, False, -1).serialize() + op.serialize()
        return out + multiheader_struct.pack(-1, True, -1)

    @staticmethod
    def deserialize(buffer: bytes, offset: int) -> list[Any]:
        results: list[Any] = []
        while True:
            header, offset = MultiHeader.deserialize(buffer, offset)
            if header.done:
                return results
            if header.type == GetData.type:
                data, offset = read_buffer(buffer, offset)
                results.append((data, ZnodeStat._make(stat_struct.unpack_from(buffer, offset))))
                offset += stat_struct.size
            elif header.type == GetChildren.type:
                count = int_struct.unpack_from(buffer, offset)[0]
                offset += int_struct.size
                names = []
                for _ in range(max(count, 0)):
                    name, offset = read_string(buffer, offset)
                    names.append(name)
                results.append(names)
            elif header.type == _ERROR:
                err = int_struct.unpack_from(buffer, offset)[0]
                offset += int_struct.size
                results.append(EXCEPTIONS[err]())
            else:
                raise ValueError(f"multiRead: an answer of type {header.type}")


class ManyReads:
    """Listings and reads of many paths of one kazoo client; ``get`` waits for an async
    result (the registry's timeout); ``decoder`` counts the nodes we may not read."""

    def __init__(self, client: Any, get: Callable[[Any], Any], decoder: Decoder) -> None:
        self.client, self._get, self._decoder = client, get, decoder
        #: None until a server answered a multiRead; False: older than 3.6
        self.supported: bool | None = None

    def children(self, paths: Sequence[str], refused: list[str] | None = None
                 ) -> dict[str, list[str]]:
        """The names in each directory of ``paths`` (one that does not exist is left out; one
        we may not list too, and added to ``refused``)."""
        return self._read([GetChildren(p, None) for p in paths], self.client.get_children_async,
                          refused)

    def data(self, paths: Sequence[str], refused: list[str] | None = None,
             ) -> dict[str, tuple[bytes, ZnodeStat]]:
        """``(data, stat)`` of each node of ``paths`` (one that does not exist, or that we may
        not read, is left out; the latter added to ``refused``)."""
        return self._read([GetData(p, None) for p in paths], self.client.get_async, refused)

    def _read(self, ops: list[Any], one: Callable[[str], Any],
              refused: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        denied: list[tuple[Any, NoAuthError]] = []
        for start in range(0, len(ops), MAX_OPS):
            chunk = ops[start:start + MAX_OPS]
            answers = self._multi(chunk) if self.supported is not False else None
            if answers is None:  # one request per path, all sent before the first answer
                answers = []
                for pending in [one(op.path) for op in chunk]:
                    try:
                        answers.append(self._get(pending))
                    except (NoNodeError, NoAuthError) as exc:
                        answers.append(exc)
            for op, answer in zip(chunk, answers, strict=True):
                if isinstance(answer, NoNodeError):
                    continue
                if isinstance(answer, NoAuthError):
                    denied.append((op, answer))
                    continue
                if isinstance(answer, Exception):
                    raise answer
                out[op.path] = answer
        listed = any(isinstance(op, GetChildren) for op in ops if op.path in out)
        for op, answer in denied:
            # a listing refused while none other was: our credentials, said (the caller
            # tells to give them); else one directory, or a node, planted against us: left out
            if isinstance(op, GetChildren) and not listed:
                raise answer
            self._decoder.denied(op.path)
            if refused is not None:
                refused.append(op.path)
        return out

    def _multi(self, chunk: list[Any]) -> list[Any] | None:
        result = self.client.handler.async_result()
        self.client._call(MultiRead(chunk), result)
        try:
            answers: list[Any] = self._get(result)
        except UnimplementedError:
            log.warning("this ZooKeeper has no multiRead (older than 3.6): reading one path "
                        "per request")
            self.supported = False
            return None
        self.supported = True
        return answers
