"""The event-stream codec: golden frames, every chunking, corruption, limits, properties.

Golden frames are written out byte by byte, with their CRCs, so the decoder is
checked against fixed bytes rather than against our own encoder. Frames that
must be well formed apart from one fault are built by ``raw_frame``, which
computes the CRCs with zlib directly.
"""

from __future__ import annotations

import random
import struct
import uuid
import zlib
from collections.abc import Iterable, Mapping

import pytest

import eventstream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstream import (
    MAX_HEADERS_BYTES,
    MAX_PAYLOAD_BYTES,
    ChecksumError,
    Decoder,
    EventStreamError,
    FrameLengthError,
    HeaderError,
    Int8,
    Int16,
    Int32,
    Int64,
    Message,
    Timestamp,
    TruncatedStreamError,
    decode_headers,
    encode,
    encode_headers,
)

# Helpers ##################################################################


def raw_frame(block: bytes, payload: bytes = b"") -> bytes:
    """A frame around an arbitrary header block, with correct CRCs."""
    prelude = struct.pack(">II", 16 + len(block) + len(payload), len(block))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + block + payload
    return body + struct.pack(">I", zlib.crc32(body))


def raw_prelude(total_length: int, headers_length: int) -> bytes:
    """Just a prelude, with a correct CRC, so the lengths are what gets judged."""
    head = struct.pack(">II", total_length, headers_length)
    return head + struct.pack(">I", zlib.crc32(head))


def typed(headers: Mapping[str, object]) -> list[tuple[str, type, object]]:
    """Headers in wire order with each value's type, so Int16(5) != Int32(5)."""
    return [(name, type(value), value) for name, value in headers.items()]


def shapes(messages: Iterable[Message]) -> list[tuple[list, bytes]]:
    return [(typed(m.headers), m.payload) for m in messages]


def decode(*chunks: bytes) -> list[Message]:
    """Feed each chunk, drain after each, then close: the h11-style loop."""
    decoder = Decoder()
    messages: list[Message] = []
    for chunk in chunks:
        decoder.feed(chunk)
        messages.extend(decoder)
    decoder.close()
    return messages


def decode_into(messages: list[Message], *chunks: bytes) -> Decoder:
    """Like ``decode``, but keeps what came out before an error in ``messages``."""
    decoder = Decoder()
    for chunk in chunks:
        decoder.feed(chunk)
        messages.extend(decoder)
    decoder.close()
    return decoder


def decode_until_error(*chunks: bytes) -> list[Message]:
    """Messages before the first EventStreamError; any other exception escapes."""
    messages: list[Message] = []
    try:
        decode_into(messages, *chunks)
    except EventStreamError:
        pass
    for message in messages:
        assert type(message) is Message and type(message.payload) is bytes
    return messages


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


# Golden frames ############################################################

# PROTOCOL.md 5.2, checked there against AWS's @smithy/eventstream-codec.
GOLDEN_BYTES = bytes.fromhex(
    "0000007c0000005c3bddcf780b3a6576656e742d74797065070016617373697374616e74"
    "526573706f6e73654576656e740d3a636f6e74656e742d747970650700106170706c6963"
    "6174696f6e2f6a736f6e0d3a6d6573736167652d747970650700056576656e747b22636f"
    "6e74656e74223a224869227db02babdc"
)
GOLDEN_MESSAGE = Message(
    {
        ":event-type": "assistantResponseEvent",
        ":content-type": "application/json",
        ":message-type": "event",
    },
    b'{"content":"Hi"}',
)
GOLDEN_PRELUDE_CRC = 0x3BDDCF78
GOLDEN_MESSAGE_CRC = 0xB02BABDC
# Where each field of the golden frame sits: (start, end) byte offsets.
GOLDEN_FIELDS = {
    "total length": (0, 4),
    "headers length": (4, 8),
    "prelude crc": (8, 12),
    "headers": (12, 104),
    "payload": (104, 120),
    "message crc": (120, 124),
}

EMPTY_MESSAGE = (
    b"\x00\x00\x00\x10"  # total length 16
    b"\x00\x00\x00\x00"  # headers length 0
    b"\x05\xc2\x48\xeb"  # prelude crc
    b"\x7d\x98\xc8\xff",  # message crc
    Message({}, b""),
)

BOOL_TRUE_HEADER = (
    b"\x00\x00\x00\x16"  # total length 22
    b"\x00\x00\x00\x06"  # headers length 6
    b"\x63\xe1\x18\x7e"  # prelude crc
    b"\x04true"  # name length 4, name
    b"\x00"  # type 0: bool true, no value bytes
    b"\xf1\xe7\xbc\xd7",  # message crc
    Message({"true": True}, b""),
)

BOOL_FALSE_HEADER = (
    b"\x00\x00\x00\x17"  # total length 23
    b"\x00\x00\x00\x07"  # headers length 7
    b"\x29\x86\x01\x58"  # prelude crc
    b"\x05false"  # name length 5, name
    b"\x01"  # type 1: bool false, no value bytes
    b"\x52\x31\x7e\xf4",  # message crc
    Message({"false": False}, b""),
)

INT8_HEADER = (
    b"\x00\x00\x00\x17"  # total length 23
    b"\x00\x00\x00\x07"  # headers length 7
    b"\x29\x86\x01\x58"  # prelude crc
    b"\x04byte"  # name length 4, name
    b"\x02"  # type 2: int8
    b"\xff"  # -1
    b"\xc2\xf8\x69\xdc",  # message crc
    Message({"byte": Int8(-1)}, b""),
)

INT16_HEADER = (
    b"\x00\x00\x00\x19"  # total length 25
    b"\x00\x00\x00\x09"  # headers length 9
    b"\x71\x0e\x92\x3e"  # prelude crc
    b"\x05short"  # name length 5, name
    b"\x03"  # type 3: int16
    b"\xff\xfe"  # -2
    b"\xc5\x7b\x86\x5a",  # message crc
    Message({"short": Int16(-2)}, b""),
)

INT32_HEADER = (
    b"\x00\x00\x00\x1d"  # total length 29
    b"\x00\x00\x00\x0d"  # headers length 13
    b"\x83\xe3\xf0\xe7"  # prelude crc
    b"\x07integer"  # name length 7, name
    b"\x04"  # type 4: int32
    b"\x00\x00\x00\x2a"  # 42
    b"\x8e\x8e\xfb\xde",  # message crc
    Message({"integer": Int32(42)}, b""),
)

INT64_HEADER = (
    b"\x00\x00\x00\x1e"  # total length 30
    b"\x00\x00\x00\x0e"  # headers length 14
    b"\x5d\x4a\xdb\x8d"  # prelude crc
    b"\x04long"  # name length 4, name
    b"\x05"  # type 5: int64
    b"\x7f\xff\xff\xff\xff\xff\xff\xff"  # 2**63 - 1
    b"\x18\xf9\xb7\x00",  # message crc
    Message({"long": Int64(2**63 - 1)}, b""),
)

BYTE_ARRAY_HEADER = (
    b"\x00\x00\x00\x1c"  # total length 28
    b"\x00\x00\x00\x0c"  # headers length 12
    b"\xc9\x84\xe9\xc1"  # prelude crc
    b"\x05bytes"  # name length 5, name
    b"\x06"  # type 6: byte array
    b"\x00\x03"  # value length 3
    b"\x00\xff\x01"  # value
    b"\x12\xf0\x4e\xf6",  # message crc
    Message({"bytes": b"\x00\xff\x01"}, b""),
)

STRING_HEADER = (
    b"\x00\x00\x00\x1f"  # total length 31
    b"\x00\x00\x00\x0f"  # headers length 15
    b"\x17\x2d\xc2\xab"  # prelude crc
    b"\x06string"  # name length 6, name
    b"\x07"  # type 7: string
    b"\x00\x05"  # value length 5 (bytes, not characters)
    b"caf\xc3\xa9"  # "café" in UTF-8
    b"\xf1\x1f\x04\x17",  # message crc
    Message({"string": "café"}, b""),
)

TIMESTAMP_HEADER = (
    b"\x00\x00\x00\x1e"  # total length 30
    b"\x00\x00\x00\x0e"  # headers length 14
    b"\x5d\x4a\xdb\x8d"  # prelude crc
    b"\x04time"  # name length 4, name
    b"\x08"  # type 8: timestamp
    b"\x00\x00\x01\x8c\x3f\x5e\x7a\x00"  # 1701870205440 ms
    b"\xc6\x35\x47\x94",  # message crc
    Message({"time": Timestamp(1701870205440)}, b""),
)

UUID_HEADER = (
    b"\x00\x00\x00\x26"  # total length 38
    b"\x00\x00\x00\x16"  # headers length 22
    b"\xdf\x77\xb0\x9c"  # prelude crc
    b"\x04uuid"  # name length 4, name
    b"\x09"  # type 9: uuid
    b"\x12\x34\x56\x78\x12\x34\x56\x78\x12\x34\x56\x78\x12\x34\x56\x78"  # 16 bytes
    b"\xc8\x70\x09\xc6",  # message crc
    Message({"uuid": uuid.UUID("12345678-1234-5678-1234-567812345678")}, b""),
)

PAYLOAD_ONLY = (
    b"\x00\x00\x00\x20"  # total length 32
    b"\x00\x00\x00\x00"  # headers length 0
    b"\xa4\xe3\xf0\x6d"  # prelude crc
    b'{"content":"Hi"}'  # payload, 16 bytes
    b"\xf5\x63\x1d\xa0",  # message crc
    Message({}, b'{"content":"Hi"}'),
)

SEVERAL_HEADERS = (
    b"\x00\x00\x00\x5a"  # total length 90
    b"\x00\x00\x00\x3d"  # headers length 61
    b"\x4f\xe9\x44\x12"  # prelude crc
    b"\x0d:message-type"  # name length 13, name
    b"\x07\x00\x05event"  # string, length 5
    b"\x0b:event-type"  # name length 11, name
    b"\x07\x00\x0dmeteringEvent"  # string, length 13
    b"\x05count"  # name length 5, name
    b"\x04\x00\x00\x00\x07"  # int32 7
    b'{"usage":1.5}'  # payload, 13 bytes
    b"\x25\x72\xae\x5d",  # message crc
    Message(
        {":message-type": "event", ":event-type": "meteringEvent", "count": Int32(7)},
        b'{"usage":1.5}',
    ),
)

POSITIVE_CASES = [
    EMPTY_MESSAGE,
    BOOL_TRUE_HEADER,
    BOOL_FALSE_HEADER,
    INT8_HEADER,
    INT16_HEADER,
    INT32_HEADER,
    INT64_HEADER,
    BYTE_ARRAY_HEADER,
    STRING_HEADER,
    TIMESTAMP_HEADER,
    UUID_HEADER,
    PAYLOAD_ONLY,
    SEVERAL_HEADERS,
    (GOLDEN_BYTES, GOLDEN_MESSAGE),
]
POSITIVE_IDS = [
    "empty",
    "bool-true",
    "bool-false",
    "int8",
    "int16",
    "int32",
    "int64",
    "byte-array",
    "string",
    "timestamp",
    "uuid",
    "payload-only",
    "several-headers",
    "protocol-golden",
]

# Malformed frames #########################################################

BAD_PRELUDE_CRC = (
    b"\x00\x00\x00\x10"  # total length 16
    b"\x00\x00\x00\x00"  # headers length 0
    b"\x05\xc2\x48\xea"  # prelude crc, last bit flipped
    b"\x7d\x98\xc8\xff",  # message crc
    ChecksumError,
)

BAD_MESSAGE_CRC = (
    b"\x00\x00\x00\x10"  # total length 16
    b"\x00\x00\x00\x00"  # headers length 0
    b"\x05\xc2\x48\xeb"  # prelude crc
    b"\x7d\x98\xc8\xfe",  # message crc, last bit flipped
    ChecksumError,
)

# The length faults below carry a correct prelude CRC and nothing else: the
# decoder must judge the lengths as soon as the prelude is in, not wait for
# (or buffer) the bytes the prelude claims.
TOTAL_LENGTH_BELOW_MINIMUM = (
    b"\x00\x00\x00\x0f"  # total length 15, one short of the 16-byte minimum
    b"\x00\x00\x00\x00"  # headers length 0
    b"\xe7\x72\x48\xb8",  # prelude crc
    FrameLengthError,
)

TOTAL_LENGTH_ZERO = (
    b"\x00\x00\x00\x00"  # total length 0
    b"\x00\x00\x00\x00"  # headers length 0
    b"\x65\x22\xdf\x69",  # prelude crc
    FrameLengthError,
)

HEADERS_OVER_LIMIT = (
    b"\x00\x02\x00\x11"  # total length 131089
    b"\x00\x02\x00\x01"  # headers length 131073, one over 128 KiB
    b"\xdb\xbe\x94\x8a",  # prelude crc
    FrameLengthError,
)

PAYLOAD_OVER_LIMIT = (
    b"\x01\x00\x00\x11"  # total length 16777233: a payload one over 16 MiB
    b"\x00\x00\x00\x00"  # headers length 0
    b"\xf4\x08\x61\xc5",  # prelude crc
    FrameLengthError,
)

HEADERS_LONGER_THAN_FRAME = (
    b"\x00\x00\x00\x10"  # total length 16: room for no headers
    b"\x00\x00\x00\x01"  # headers length 1
    b"\x72\xc5\x78\x7d",  # prelude crc
    FrameLengthError,
)

UNKNOWN_HEADER_TYPE = (
    b"\x00\x00\x00\x15"  # total length 21
    b"\x00\x00\x00\x05"  # headers length 5
    b"\xbd\x48\x33\x14"  # prelude crc
    b"\x03abc"  # name length 3, name
    b"\x0a"  # type 10: there is no such type
    b"\xae\x24\x4d\xaa",  # message crc
    HeaderError,
)

HEADER_NAME_PAST_BLOCK = (
    b"\x00\x00\x00\x14"  # total length 20
    b"\x00\x00\x00\x04"  # headers length 4
    b"\xf7\x2f\x2a\x32"  # prelude crc
    b"\x09abc"  # name length 9, but only 3 bytes follow
    b"\xc3\x09\x98\xdf",  # message crc
    HeaderError,
)

HEADER_TYPE_MISSING = (
    b"\x00\x00\x00\x14"  # total length 20
    b"\x00\x00\x00\x04"  # headers length 4
    b"\xf7\x2f\x2a\x32"  # prelude crc
    b"\x03abc"  # name length 3, name, then the block ends before the type
    b"\xac\xb4\x78\xbb",  # message crc
    HeaderError,
)

STRING_LENGTH_PAST_BLOCK = (
    b"\x00\x00\x00\x16"  # total length 22
    b"\x00\x00\x00\x06"  # headers length 6
    b"\x63\xe1\x18\x7e"  # prelude crc
    b"\x03abc"  # name length 3, name
    b"\x07"  # type 7: string
    b"\x00"  # one of the two value-length bytes
    b"\x5b\x9b\x15\xe5",  # message crc
    HeaderError,
)

STRING_VALUE_PAST_BLOCK = (
    b"\x00\x00\x00\x19"  # total length 25
    b"\x00\x00\x00\x09"  # headers length 9
    b"\x71\x0e\x92\x3e"  # prelude crc
    b"\x03abc"  # name length 3, name
    b"\x07"  # type 7: string
    b"\x00\x10"  # value length 16
    b"hi"  # but only 2 bytes are left in the block
    b"\xc0\x29\x09\xd4",  # message crc
    HeaderError,
)

INT32_VALUE_PAST_BLOCK = (
    b"\x00\x00\x00\x17"  # total length 23
    b"\x00\x00\x00\x07"  # headers length 7
    b"\x29\x86\x01\x58"  # prelude crc
    b"\x03abc"  # name length 3, name
    b"\x04"  # type 4: int32
    b"\x00\x00"  # 2 of its 4 bytes
    b"\x0d\x14\xc0\x51",  # message crc
    HeaderError,
)

UUID_VALUE_PAST_BLOCK = (
    b"\x00\x00\x00\x24"  # total length 36
    b"\x00\x00\x00\x14"  # headers length 20
    b"\x4b\xb9\x82\xd0"  # prelude crc
    b"\x03abc"  # name length 3, name
    b"\x09"  # type 9: uuid
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # 15 of 16 bytes
    b"\xe4\xff\x84\x1f",  # message crc
    HeaderError,
)

EMPTY_HEADER_NAME = (
    b"\x00\x00\x00\x12"  # total length 18
    b"\x00\x00\x00\x02"  # headers length 2
    b"\x91\x0c\x7a\xa7"  # prelude crc
    b"\x00"  # name length 0
    b"\x00"  # type 0: bool true
    b"\x7b\xc1\x36\x1e",  # message crc
    HeaderError,
)

DUPLICATE_HEADER = (
    b"\x00\x00\x00\x1a"  # total length 26
    b"\x00\x00\x00\x0a"  # headers length 10
    b"\xaf\xa7\xb9\x54"  # prelude crc
    b"\x03abc"  # name length 3, name
    b"\x00"  # type 0: bool true
    b"\x03abc"  # the same name again
    b"\x01"  # type 1: bool false
    b"\xc8\xb4\x48\x7d",  # message crc
    HeaderError,
)

NON_UTF8_STRING_VALUE = (
    b"\x00\x00\x00\x19"  # total length 25
    b"\x00\x00\x00\x09"  # headers length 9
    b"\x71\x0e\x92\x3e"  # prelude crc
    b"\x03abc"  # name length 3, name
    b"\x07"  # type 7: string
    b"\x00\x02"  # value length 2
    b"\xc3\x28"  # a UTF-8 lead byte followed by a non-continuation byte
    b"\x93\xa3\x6a\xee",  # message crc
    HeaderError,
)

NON_UTF8_HEADER_NAME = (
    b"\x00\x00\x00\x14"  # total length 20
    b"\x00\x00\x00\x04"  # headers length 4
    b"\xf7\x2f\x2a\x32"  # prelude crc
    b"\x02\xff\xfe"  # name length 2, name not UTF-8
    b"\x00"  # type 0: bool true
    b"\xea\xca\x7f\xd0",  # message crc
    HeaderError,
)

# The stream stops early; only close() can tell.
TRUNCATED_IN_PRELUDE = (GOLDEN_BYTES[:5], TruncatedStreamError)
TRUNCATED_AFTER_PRELUDE = (GOLDEN_BYTES[:12], TruncatedStreamError)
TRUNCATED_BEFORE_MESSAGE_CRC = (GOLDEN_BYTES[:-1], TruncatedStreamError)

NEGATIVE_CASES = [
    BAD_PRELUDE_CRC,
    BAD_MESSAGE_CRC,
    TOTAL_LENGTH_BELOW_MINIMUM,
    TOTAL_LENGTH_ZERO,
    HEADERS_OVER_LIMIT,
    PAYLOAD_OVER_LIMIT,
    HEADERS_LONGER_THAN_FRAME,
    UNKNOWN_HEADER_TYPE,
    HEADER_NAME_PAST_BLOCK,
    HEADER_TYPE_MISSING,
    STRING_LENGTH_PAST_BLOCK,
    STRING_VALUE_PAST_BLOCK,
    INT32_VALUE_PAST_BLOCK,
    UUID_VALUE_PAST_BLOCK,
    EMPTY_HEADER_NAME,
    DUPLICATE_HEADER,
    NON_UTF8_STRING_VALUE,
    NON_UTF8_HEADER_NAME,
    TRUNCATED_IN_PRELUDE,
    TRUNCATED_AFTER_PRELUDE,
    TRUNCATED_BEFORE_MESSAGE_CRC,
]
NEGATIVE_IDS = [
    "bad-prelude-crc",
    "bad-message-crc",
    "total-length-15",
    "total-length-0",
    "headers-over-limit",
    "payload-over-limit",
    "headers-longer-than-frame",
    "unknown-header-type",
    "header-name-past-block",
    "header-type-missing",
    "string-length-past-block",
    "string-value-past-block",
    "int32-value-past-block",
    "uuid-value-past-block",
    "empty-header-name",
    "duplicate-header",
    "non-utf8-string-value",
    "non-utf8-header-name",
    "truncated-in-prelude",
    "truncated-after-prelude",
    "truncated-before-message-crc",
]


# The golden vector ########################################################


def test_decoder_reads_the_protocol_golden_vector():
    (message,) = decode(GOLDEN_BYTES)
    assert shapes([message]) == shapes([GOLDEN_MESSAGE])
    assert list(message.headers) == [":event-type", ":content-type", ":message-type"]


def test_encode_reproduces_the_protocol_golden_vector():
    assert encode(GOLDEN_MESSAGE.headers, GOLDEN_MESSAGE.payload) == GOLDEN_BYTES


# Positive cases, every way of chunking them ###############################


def assert_decodes_every_way(data: bytes, expected: Message) -> None:
    """h11's ``tr()``: whole, byte by byte, at random cuts, and with trailing bytes."""
    want = shapes([expected])

    assert shapes(decode(data)) == want

    decoder = Decoder()
    for i in range(len(data) - 1):
        decoder.feed(data[i : i + 1])
        assert list(decoder) == [], f"a message came out after {i + 1} of {len(data)} bytes"
    decoder.feed(data[-1:])
    assert shapes(decoder) == want
    decoder.close()

    rng = random.Random(len(data))
    for _ in range(25):
        cuts = rng.sample(range(1, len(data)), k=rng.randint(1, min(6, len(data) - 1)))
        assert shapes(decode(*split(data, cuts))) == want, sorted(cuts)

    # The start of a next frame must stay buffered, intact, after this one.
    for extra in (1, 11, 12, 13, len(GOLDEN_BYTES) - 1):
        decoder = Decoder()
        decoder.feed(data + GOLDEN_BYTES[:extra])
        assert shapes(decoder) == want
        with pytest.raises(TruncatedStreamError, match=rf"offset {len(data)}: {extra}\b"):
            decoder.close()

        decoder = Decoder()
        decoder.feed(data + GOLDEN_BYTES[:extra])
        assert shapes(decoder) == want
        decoder.feed(GOLDEN_BYTES[extra:])
        assert shapes(decoder) == shapes([GOLDEN_MESSAGE])
        decoder.close()


@pytest.mark.parametrize("data, expected", POSITIVE_CASES, ids=POSITIVE_IDS)
def test_decoder_reads_golden_frame_however_it_is_split(data, expected):
    assert_decodes_every_way(data, expected)


@pytest.mark.parametrize("data, expected", POSITIVE_CASES, ids=POSITIVE_IDS)
def test_encode_reproduces_golden_frame(data, expected):
    assert encode(expected.headers, expected.payload) == data


def test_decoder_reads_all_golden_frames_from_one_buffer():
    blob = b"".join(data for data, _ in POSITIVE_CASES)
    expected = shapes(message for _, message in POSITIVE_CASES)
    assert shapes(decode(blob)) == expected
    rng = random.Random(5)
    for _ in range(50):
        cuts = rng.sample(range(len(blob) + 1), k=rng.randint(1, 40))
        assert shapes(decode(*split(blob, cuts))) == expected


def test_decoder_reads_a_realistic_kiro_stream_at_random_boundaries():
    def event(event_type: str, payload: bytes) -> tuple[dict, bytes]:
        headers = {
            ":event-type": event_type,
            ":content-type": "application/json",
            ":message-type": "event",
        }
        return headers, payload

    frames = [event("assistantResponseEvent", b'{"content":"%d "}' % i) for i in range(200)]
    frames += [
        event("toolUseEvent", b'{"toolUseId":"tooluse_1","name":"read_file","input":"{\\"pa"}'),
        event("toolUseEvent", b'{"toolUseId":"tooluse_1","input":"th\\": 1}"}'),
        event("toolUseEvent", b'{"toolUseId":"tooluse_1","stop":true}'),
        event("meteringEvent", b'{"usage":0.0123,"unit":"credit"}'),
        event("contextUsageEvent", b'{"contextUsagePercentage":37.5}'),
        (
            {
                ":exception-type": "ThrottlingException",
                ":content-type": "application/json",
                ":message-type": "exception",
            },
            b'{"message":"slow down"}',
        ),
    ]
    blob = b"".join(encode(h, p) for h, p in frames)
    expected = [(typed(h), p) for h, p in frames]
    for seed in range(20):
        rng = random.Random(seed)
        cuts = rng.sample(range(len(blob) + 1), k=rng.randint(1, 300))
        assert shapes(decode(*split(blob, cuts))) == expected, f"seed {seed}"


# Negative cases ###########################################################


@pytest.mark.parametrize("data, error", NEGATIVE_CASES, ids=NEGATIVE_IDS)
def test_decoder_rejects_malformed_frame(data, error):
    messages: list[Message] = []
    with pytest.raises(error):
        decode_into(messages, data)
    assert messages == []


@pytest.mark.parametrize("data, error", NEGATIVE_CASES, ids=NEGATIVE_IDS)
def test_decoder_rejects_malformed_frame_fed_byte_by_byte(data, error):
    messages: list[Message] = []
    with pytest.raises(error):
        decode_into(messages, *(data[i : i + 1] for i in range(len(data))))
    assert messages == []


@pytest.mark.parametrize("data, error", NEGATIVE_CASES, ids=NEGATIVE_IDS)
def test_decoder_yields_good_frames_before_a_malformed_one(data, error):
    messages: list[Message] = []
    with pytest.raises(error):
        decode_into(messages, GOLDEN_BYTES + GOLDEN_BYTES + data)
    assert shapes(messages) == shapes([GOLDEN_MESSAGE, GOLDEN_MESSAGE])


@pytest.mark.parametrize("data, error", NEGATIVE_CASES, ids=NEGATIVE_IDS)
def test_take_hands_out_the_good_frames_then_raises(data, error):
    decoder = Decoder()
    decoder.feed(GOLDEN_BYTES + GOLDEN_BYTES + data)
    assert shapes(decoder.take()) == shapes([GOLDEN_MESSAGE, GOLDEN_MESSAGE])
    with pytest.raises(error):
        decoder.take()
        decoder.close()  # only close() can find a truncation


@pytest.mark.parametrize("data, error", NEGATIVE_CASES, ids=NEGATIVE_IDS)
def test_decoder_errors_are_sticky(data, error):
    decoder = Decoder()
    decoder.feed(data)
    with pytest.raises(error) as first:
        list(decoder)
        decoder.close()  # only close() can find a truncation
    if error is not TruncatedStreamError:
        decoder.feed(GOLDEN_BYTES)  # good bytes after the fault do not revive it
    with pytest.raises(error) as again:
        list(decoder)
    assert again.value is first.value
    with pytest.raises(error):
        decoder.close()


@pytest.mark.parametrize(
    "data",
    [
        TOTAL_LENGTH_BELOW_MINIMUM[0],
        HEADERS_OVER_LIMIT[0],
        PAYLOAD_OVER_LIMIT[0],
        HEADERS_LONGER_THAN_FRAME[0],
    ],
    ids=["total-length-15", "headers-over-limit", "payload-over-limit", "headers-past-frame"],
)
def test_decoder_rejects_bad_lengths_as_soon_as_the_prelude_arrives(data):
    decoder = Decoder()
    decoder.feed(data)
    with pytest.raises(FrameLengthError):
        next(decoder)


@pytest.mark.parametrize(
    "data", [TOTAL_LENGTH_BELOW_MINIMUM[0], TOTAL_LENGTH_ZERO[0]], ids=["15", "0"]
)
def test_frame_below_minimum_length_is_reported_as_such(data):
    with pytest.raises(FrameLengthError, match=r"the minimum is 16\b"):
        decode(data)


def test_decoder_checks_prelude_crc_before_trusting_lengths():
    # A 15-byte total with a wrong prelude CRC is a checksum fault, not a length one.
    data = bytearray(TOTAL_LENGTH_BELOW_MINIMUM[0])
    data[11] ^= 1
    with pytest.raises(ChecksumError):
        decode(bytes(data))


def test_decoder_checks_message_crc_before_reading_headers():
    # The unknown header type is never reached: the CRC check comes first.
    data = bytearray(UNKNOWN_HEADER_TYPE[0])
    data[-1] ^= 1
    with pytest.raises(ChecksumError):
        decode(bytes(data))


def test_decoder_accepts_header_block_exactly_at_the_limit():
    # Two byte-array headers: 5 bytes of overhead each (name length, name,
    # type, two length bytes), values filling the rest of 128 KiB.
    fill = MAX_HEADERS_BYTES - 10 - 65535
    headers = {"a": b"\x01" * 65535, "b": b"\x02" * fill}
    (message,) = decode(encode(headers))
    assert message.headers == headers
    over = encode_headers({"a": b"\x01" * 65535, "b": b"\x02" * (fill + 1)})
    with pytest.raises(FrameLengthError):
        decode(raw_frame(over))


def test_decoder_accepts_payload_exactly_at_the_limit():
    payload = bytes(MAX_PAYLOAD_BYTES)
    (message,) = decode(encode({}, payload))
    assert message.payload == payload
    with pytest.raises(FrameLengthError):
        decode(raw_frame(b"", payload + b"\x00"))


# Corruption ###############################################################


def flip(data: bytes, bit: int) -> bytes:
    corrupted = bytearray(data)
    corrupted[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(corrupted)


@pytest.mark.parametrize("field", GOLDEN_FIELDS)
def test_decoder_rejects_every_single_bit_flip(field):
    start, end = GOLDEN_FIELDS[field]
    crc = "prelude" if start < 12 else "message"
    for bit in range(start * 8, end * 8):
        messages: list[Message] = []
        with pytest.raises(ChecksumError) as info:
            decode_into(messages, flip(GOLDEN_BYTES, bit))
        assert messages == [], f"bit {bit}"
        assert info.value.what == crc, f"bit {bit}"


@pytest.mark.parametrize("field", GOLDEN_FIELDS)
def test_decoder_rejects_bit_flips_in_a_later_frame_fed_byte_by_byte(field):
    start, end = GOLDEN_FIELDS[field]
    for bit in range(start * 8, end * 8, 7):
        data = GOLDEN_BYTES + flip(GOLDEN_BYTES, bit)
        messages: list[Message] = []
        with pytest.raises(ChecksumError):
            decode_into(messages, *(data[i : i + 1] for i in range(len(data))))
        assert shapes(messages) == shapes([GOLDEN_MESSAGE]), f"bit {bit}"


# Error messages ###########################################################


@pytest.mark.parametrize("drain_first", [False, True], ids=["one-pass", "after-compaction"])
@pytest.mark.parametrize(
    "field, bad_crc, good_crc, what",
    [
        ((8, 12), 0xDEADBEEF, GOLDEN_PRELUDE_CRC, "prelude"),
        ((120, 124), 0x00000001, GOLDEN_MESSAGE_CRC, "message"),
    ],
    ids=["prelude", "message"],
)
def test_checksum_error_names_both_crcs_and_the_stream_offset(
    field, bad_crc, good_crc, what, drain_first
):
    start, end = field
    bad = GOLDEN_BYTES[:start] + struct.pack(">I", bad_crc) + GOLDEN_BYTES[end:]
    decoder = Decoder()
    decoder.feed(GOLDEN_BYTES)
    if drain_first:
        assert len(list(decoder)) == 1
    decoder.feed(bad)
    with pytest.raises(ChecksumError) as info:
        list(decoder)
    text = str(info.value)
    assert f"0x{bad_crc:08x}" in text
    assert f"0x{good_crc:08x}" in text
    assert "offset 124" in text
    assert what in text
    assert (info.value.expected, info.value.actual, info.value.offset) == (bad_crc, good_crc, 124)


@pytest.mark.parametrize(
    "data, error",
    [HEADERS_OVER_LIMIT, PAYLOAD_OVER_LIMIT, DUPLICATE_HEADER, TRUNCATED_AFTER_PRELUDE],
    ids=["headers-over-limit", "payload-over-limit", "duplicate-header", "truncated"],
)
def test_framing_errors_name_the_stream_offset(data, error):
    with pytest.raises(error, match=r"offset 248\b"):
        decode(GOLDEN_BYTES, GOLDEN_BYTES, data)


def test_truncation_error_says_how_much_of_the_frame_arrived():
    with pytest.raises(TruncatedStreamError, match=r"offset 0: 100 of 124 bytes"):
        decode(GOLDEN_BYTES[:100])


# API contract #############################################################


def test_feed_only_buffers_and_never_raises_a_framing_error():
    decoder = Decoder()
    decoder.feed(BAD_PRELUDE_CRC[0])
    decoder.feed(b"\xff" * 100)
    with pytest.raises(ChecksumError):
        next(decoder)


def test_feed_after_close_is_a_runtime_error():
    decoder = Decoder()
    decoder.feed(GOLDEN_BYTES)
    assert len(list(decoder)) == 1
    decoder.close()
    decoder.close()  # closing a cleanly ended stream twice is harmless
    with pytest.raises(RuntimeError):
        decoder.feed(GOLDEN_BYTES)


def test_decoder_accepts_empty_chunks_and_empty_stream():
    assert decode() == []
    assert decode(b"", b"") == []
    assert shapes(decode(b"", GOLDEN_BYTES, b"")) == shapes([GOLDEN_MESSAGE])


def test_decoder_accepts_bytearray_and_memoryview_chunks():
    data = bytearray(GOLDEN_BYTES)
    messages = decode(data[:50], memoryview(GOLDEN_BYTES)[50:])
    assert shapes(messages) == shapes([GOLDEN_MESSAGE])


def test_message_headers_are_read_only():
    (first, second) = decode(GOLDEN_BYTES + GOLDEN_BYTES)
    with pytest.raises(TypeError):
        first.headers[":event-type"] = "other"  # type: ignore[index]
    assert second.headers[":event-type"] == "assistantResponseEvent"


def test_decoder_drains_a_large_blob_completely():
    """Structural check of linear cost: one pass, then nothing is left behind."""
    frames = [
        encode(GOLDEN_MESSAGE.headers, b'{"content":"%d"}' % i) for i in range(20_000)
    ]
    decoder = Decoder()
    decoder.feed(b"".join(frames))
    payloads = [message.payload for message in decoder]
    assert payloads == [b'{"content":"%d"}' % i for i in range(20_000)]
    assert len(decoder._buffer) == 0
    decoder.close()


def test_plain_int_header_encodes_as_int32():
    (message,) = decode(encode({"n": 7}))
    assert typed(message.headers) == [("n", Int32, 7)]


@pytest.mark.parametrize(
    "headers, error",
    [
        ({"": True}, ValueError),
        ({"é" * 128: True}, ValueError),  # 256 bytes of UTF-8
        ({"n": "x" * 65536}, ValueError),
        ({"n": b"x" * 65536}, ValueError),
        ({"n": 1.5}, TypeError),
        ({"n": None}, TypeError),
    ],
    ids=["empty-name", "name-256-bytes", "string-65536", "bytes-65536", "float", "none"],
)
def test_encode_rejects_headers_the_format_cannot_carry(headers, error):
    with pytest.raises(error):
        encode(headers)


def test_encode_accepts_the_longest_name_and_value():
    headers = {"n" * 255: "v" * 65535}
    (message,) = decode(encode(headers))
    assert message.headers == headers


# Properties ###############################################################

# Names of 1..255 bytes of UTF-8: cut the encoding at 255 and drop any
# character the cut split.
header_names = (
    st.text(min_size=1, max_size=255)
    .map(lambda s: s.encode("utf-8")[:255].decode("utf-8", "ignore"))
    .filter(bool)
)
header_values = st.one_of(
    st.booleans(),
    st.integers(-(2**7), 2**7 - 1).map(Int8),
    st.integers(-(2**15), 2**15 - 1).map(Int16),
    st.integers(-(2**31), 2**31 - 1).map(Int32),
    st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.integers(-(2**63), 2**63 - 1).map(Timestamp),
    st.binary(max_size=300),
    st.text(max_size=100),
    st.uuids(),
)
header_dicts = st.dictionaries(header_names, header_values, max_size=8)
messages_st = st.tuples(header_dicts, st.binary(max_size=400))

# The autouse environment fixture in conftest has no per-example state.
quick = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.slow  # hypothesis: over a second
@quick
@given(st.lists(messages_st, max_size=6), st.data())
def test_take_gives_what_iteration_gives_however_the_stream_is_split(messages, data):
    blob = b"".join(encode(headers, payload) for headers, payload in messages)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=12), label="cuts")
    decoder = Decoder()
    got: list[Message] = []
    for chunk in split(blob, cuts):
        decoder.feed(chunk)
        got += decoder.take()
        assert decoder.take() == []  # nothing new since: nothing more
    decoder.close()
    assert shapes(got) == shapes(decode(*split(blob, cuts)))
    assert shapes(got) == [(typed(headers), payload) for headers, payload in messages]


@pytest.mark.slow  # hypothesis: about a second
@quick
@given(st.lists(messages_st, max_size=6), st.data())
def test_any_messages_survive_encode_split_decode(messages, data):
    blob = b"".join(encode(headers, payload) for headers, payload in messages)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=12), label="cuts")
    got = decode(*split(blob, cuts))
    assert shapes(got) == [(typed(headers), payload) for headers, payload in messages]


@quick
@given(header_dicts)
def test_any_header_block_decodes_to_what_was_encoded(headers):
    assert typed(decode_headers(encode_headers(headers))) == typed(headers)


@quick
@given(st.binary(max_size=300), st.binary(max_size=40))
def test_random_header_block_decodes_exactly_or_raises_header_error(block, payload):
    try:
        (message,) = decode(raw_frame(block, payload))
    except HeaderError:
        return
    # Whatever decoded must re-encode to the very same bytes: widths, types
    # and order all survive.
    assert encode_headers(message.headers) == block
    assert message.payload == payload


@quick
@given(st.binary(max_size=2000), st.data())
def test_random_bytes_raise_only_event_stream_errors(blob, data):
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=8), label="cuts")
    decode_until_error(*split(blob, cuts))


@quick
@given(
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=300), st.data()
)
def test_random_lengths_behind_a_valid_prelude_crc_raise_only_event_stream_errors(
    total_length, headers_length, tail, data
):
    blob = raw_prelude(total_length, headers_length) + tail
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=4), label="cuts")
    decode_until_error(*split(blob, cuts))


@pytest.mark.slow  # hypothesis: about a second
@quick
@given(st.lists(messages_st, min_size=1, max_size=4), st.binary(min_size=1, max_size=500))
def test_random_bytes_after_valid_frames_leave_those_frames_intact(messages, garbage):
    blob = b"".join(encode(headers, payload) for headers, payload in messages)
    got = decode_until_error(blob + garbage)
    expected = [(typed(headers), payload) for headers, payload in messages]
    assert shapes(got[: len(expected)]) == expected


@pytest.mark.slow  # hypothesis: about a second
@quick
@given(
    st.lists(messages_st, min_size=1, max_size=5),
    st.binary(min_size=1, max_size=64),
    st.data(),
)
def test_random_bytes_spliced_into_a_stream_raise_only_event_stream_errors(
    messages, garbage, data
):
    frames = [encode(headers, payload) for headers, payload in messages]
    blob = b"".join(frames)
    at = data.draw(st.integers(0, len(blob)), label="splice at")
    cuts = data.draw(st.lists(st.integers(0, len(blob) + len(garbage)), max_size=6))
    got = decode_until_error(*split(blob[:at] + garbage + blob[at:], cuts))
    # Every frame that ended before the splice comes out unharmed.
    intact, end = 0, 0
    for frame in frames:
        end += len(frame)
        if end > at:
            break
        intact += 1
    expected = [(typed(headers), payload) for headers, payload in messages[:intact]]
    assert shapes(got[:intact]) == expected


# Against botocore #########################################################


def random_header_value(rng: random.Random) -> object:
    kind = rng.randrange(10)
    if kind == 0:
        return True
    if kind == 1:
        return False
    if kind == 2:
        return Int8(rng.randint(-(2**7), 2**7 - 1))
    if kind == 3:
        return Int16(rng.randint(-(2**15), 2**15 - 1))
    if kind == 4:
        return Int32(rng.randint(-(2**31), 2**31 - 1))
    if kind == 5:
        return Int64(rng.randint(-(2**63), 2**63 - 1))
    if kind == 6:
        return rng.randbytes(rng.randrange(40))
    if kind == 7:
        return "".join(rng.choice("Hi {}\":é€😀\n") for _ in range(rng.randrange(40)))
    if kind == 8:
        return Timestamp(rng.randint(-(2**63), 2**63 - 1))
    return uuid.UUID(bytes=rng.randbytes(16))


def random_message(rng: random.Random) -> tuple[dict, bytes]:
    headers = {}
    for _ in range(rng.randrange(6)):
        name = "".join(rng.choice("abc:-xyzé€") for _ in range(rng.randint(1, 20)))
        headers[name] = random_header_value(rng)
    return headers, rng.randbytes(rng.randrange(200))


def as_botocore_reports(value: object) -> object:
    """botocore gives uuids as their 16 bytes and every integer width as int."""
    if isinstance(value, uuid.UUID):
        return value.bytes
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return value


def test_decoder_agrees_with_botocore_on_random_messages():
    botocore_eventstream = pytest.importorskip("botocore.eventstream")
    rng = random.Random(20240601)
    messages = [random_message(rng) for _ in range(3000)]
    blob = b"".join(encode(headers, payload) for headers, payload in messages)
    chunks = split(blob, rng.sample(range(len(blob)), k=len(blob) // 2000))

    theirs = botocore_eventstream.EventStreamBuffer()
    ours = Decoder()
    their_messages, our_messages = [], []
    for chunk in chunks:
        theirs.add_data(chunk)
        their_messages.extend(theirs)
        ours.feed(chunk)
        our_messages.extend(ours)
    ours.close()

    assert len(our_messages) == len(their_messages) == len(messages)
    for index, (mine, boto) in enumerate(zip(our_messages, their_messages)):
        assert {type(v) for v in boto.headers.values()} <= {bool, int, bytes, str}
        mine_view = {name: as_botocore_reports(value) for name, value in mine.headers.items()}
        assert typed(mine_view) == typed(boto.headers), f"message {index}"
        assert mine.payload == boto.payload, f"message {index}"


def test_decoder_drops_consumed_bytes_even_when_the_caller_stops_iterating_early():
    frame = eventstream.encode({":event-type": "x"}, b"p" * 100)
    decoder = eventstream.Decoder()
    for _ in range(50):
        decoder.feed(frame)
        assert next(decoder).payload == b"p" * 100  # one message per feed, no drain
    assert len(decoder._buffer) <= 2 * len(frame)


@pytest.mark.parametrize("value", [eventstream.Int8(300), 2**31, eventstream.Int16(-40000)])
def test_encoder_refuses_out_of_range_integers_with_value_error(value):
    with pytest.raises(ValueError):
        eventstream.encode({"n": value})
