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
from collections.abc import Callable, Iterator, Sequence
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
        out: dict[str, Any] = {}
        denied: list[tuple[str, NoAuthError]] = []
        for path, answer in self._answers([GetChildren(p, None) for p in paths],
                                          self.client.get_children_async):
            if isinstance(answer, NoAuthError):
                denied.append((path, answer))
            else:
                out[path] = answer
        if denied and not out:  # every listing refused: our credentials (the caller says so)
            raise denied[0][1]
        for path, _ in denied:  # else one directory planted against us: left out
            self._refused(path, refused)
        return out

    def data(self, paths: Sequence[str], refused: list[str] | None = None,
             ) -> dict[str, tuple[bytes, ZnodeStat]]:
        """``(data, stat)`` of each node of ``paths`` (one that does not exist, or that we may
        not read, is left out; the latter added to ``refused``)."""
        return dict(self.each(paths, refused))

    def each(self, paths: Sequence[str], refused: list[str] | None = None,
             ) -> Iterator[tuple[str, tuple[bytes, ZnodeStat]]]:
        """:meth:`data`, one :data:`MAX_OPS` chunk at a time: what the caller keeps of one
        answer is all that stays of it once the next is read (a full read of 10,000 records
        held at once, then decoded, left ~14 MB of the heap's pools part-used for good)."""
        for path, answer in self._answers([GetData(p, None) for p in paths],
                                          self.client.get_async):
            if isinstance(answer, NoAuthError):
                self._refused(path, refused)
            else:
                yield path, answer

    def _refused(self, path: str, refused: list[str] | None) -> None:
        self._decoder.denied(path)
        if refused is not None:
            refused.append(path)

    def _answers(self, ops: list[Any], one: Callable[[str], Any]) -> Iterator[tuple[str, Any]]:
        """``(path, answer)`` of each of ``ops``, a chunk at a time: a node that does not exist
        left out, one we may not read answered ``NoAuthError``, any other failure raised."""
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
                if isinstance(answer, Exception) and not isinstance(answer, NoAuthError):
                    if isinstance(answer, NoNodeError):
                        continue
                    raise answer
                yield op.path, answer

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
