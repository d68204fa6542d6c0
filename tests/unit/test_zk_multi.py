"""ZooKeeper's multiRead on the wire (zk_multi): the request kazoo sends, the answers it reads."""

from __future__ import annotations

import pytest
from kazoo.exceptions import NoAuthError, NoNodeError
from kazoo.protocol.serialization import (
    GetChildren,
    GetData,
    MultiHeader,
    int_struct,
    multiheader_struct,
    stat_struct,
    write_buffer,
    write_string,
)

from discovery.registry.zk_multi import MultiRead

STAT = tuple(range(1, 12))  # czxid .. pzxid


def test_request_is_each_read_after_its_header_then_the_end() -> None:
    body = MultiRead([GetData("/a", None), GetChildren("/d", None)]).serialize()
    expected = (multiheader_struct.pack(4, False, -1) + write_string("/a") + b"\0"
                + multiheader_struct.pack(8, False, -1) + write_string("/d") + b"\0"
                + multiheader_struct.pack(-1, True, -1))
    assert bytes(body) == bytes(expected)
    assert MultiRead.type == 22


def test_answers_in_order_with_each_failure_in_its_place() -> None:
    answer = (MultiHeader(4, False, 0).serialize() + write_buffer(b'{"x":1}')
              + stat_struct.pack(*STAT)
              + MultiHeader(-1, False, -101).serialize() + int_struct.pack(-101)
              + MultiHeader(8, False, 0).serialize() + int_struct.pack(2)
              + write_string("i1") + write_string("i2")
              + MultiHeader(-1, False, -102).serialize() + int_struct.pack(-102)
              + MultiHeader(8, False, 0).serialize() + int_struct.pack(0)
              + multiheader_struct.pack(-1, True, -1))
    prefix = b"\x07" * 5  # kazoo hands over the whole buffer and where the body starts
    data, missing, names, refused, empty = MultiRead.deserialize(bytes(prefix + answer), 5)
    assert data[0] == b'{"x":1}' and tuple(data[1]) == STAT
    assert isinstance(missing, NoNodeError) and isinstance(refused, NoAuthError)
    assert names == ["i1", "i2"] and empty == []


def test_an_answer_of_another_kind_is_an_error_not_a_misread() -> None:
    answer = MultiHeader(5, False, 0).serialize() + stat_struct.pack(*STAT)
    with pytest.raises(ValueError, match="type 5"):
        MultiRead.deserialize(bytes(answer), 0)
