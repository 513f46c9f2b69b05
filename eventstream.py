"""Sans-IO codec for the AWS event-stream format (``vnd.amazon.eventstream``).

Kiro's backend answers ``generateAssistantResponse`` with a stream of binary
frames. Every integer is big-endian::

    0        4        8        12              12+H            total-4   total
    +--------+--------+--------+---------------+---------------+---------+
    | total  | hdrs H | prelude| headers       | payload       | message |
    | length | length | CRC    | (H bytes)     |               | CRC     |
    +--------+--------+--------+---------------+---------------+---------+

The prelude CRC covers bytes 0..7; the message CRC covers everything before
it (so it continues from the prelude CRC). Both are CRC-32 as in zlib.

Each header is ``[name length u8][name][type u8][value]``; the ten value
types are listed in ``HEADER_TYPES`` below.

Use::

    decoder = Decoder()
    for chunk in chunks:
        decoder.feed(chunk)
        for message in decoder:
            ...
    decoder.close()          # raises if the stream stopped inside a frame

Every framing fault raises an ``EventStreamError`` subclass and leaves the
decoder failed for good: there is no skipping ahead to resynchronise, because
a proxy must not guess which bytes were meant. This module does no I/O, does
not log, and knows nothing of JSON or of what the events mean.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import NamedTuple, NoReturn, Union

__all__ = [
    "ChecksumError",
    "Decoder",
    "EventStreamError",
    "FrameLengthError",
    "HeaderError",
    "Int8",
    "Int16",
    "Int32",
    "Int64",
    "Message",
    "Timestamp",
    "TruncatedStreamError",
    "decode_headers",
    "encode",
    "encode_headers",
]

PRELUDE_BYTES = 12  # total length, headers length, prelude CRC
CRC_BYTES = 4
MIN_FRAME_BYTES = PRELUDE_BYTES + CRC_BYTES  # a frame with no headers, no payload
# The AWS specification caps the header block at 128 KiB and the payload at
# 16 MiB; larger numbers can only come from a corrupt or hostile prelude, and
# believing them would make us buffer without bound.
MAX_HEADERS_BYTES = 128 * 1024
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024

_PRELUDE = struct.Struct(">III")
_CRC = struct.Struct(">I")
_U16 = struct.Struct(">H")
# Header blocks repeat (Kiro sends the same three headers on every text
# frame), so decoded blocks are remembered: up to this many distinct ones, of
# up to this many bytes each (so a hostile stream pins at most 64 KiB).
_HEADER_CACHE_ENTRIES = 64
_HEADER_CACHE_BLOCK_BYTES = 1024


# Errors ###################################################################


class EventStreamError(Exception):
    """Base class of every framing error the decoder raises."""


class ChecksumError(EventStreamError):
    """A prelude or message CRC does not match the bytes it covers."""

    def __init__(self, what: str, *, expected: int, actual: int, offset: int) -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        self.offset = offset
        super().__init__(
            f"{what} CRC mismatch in frame at stream offset {offset}: "
            f"frame says 0x{expected:08x}, bytes give 0x{actual:08x}"
        )


class FrameLengthError(EventStreamError):
    """A length in the prelude is impossible or over a limit."""


class HeaderError(EventStreamError):
    """The header block is malformed: truncated, unknown type, bad name, duplicate."""


class TruncatedStreamError(EventStreamError):
    """The stream ended with part of a frame still buffered."""


# Header values ############################################################
#
# Decoded header values are plain Python values, except that the integer
# types keep their wire width through small int subclasses, so that a frame
# decodes and re-encodes to the same bytes. They compare equal to plain ints.


class _SizedInt(int):
    type_code: int
    struct: struct.Struct

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"


class Int8(_SizedInt):
    """Header type 2: a signed byte."""

    type_code, struct = 2, struct.Struct(">b")


class Int16(_SizedInt):
    """Header type 3: a signed 16-bit integer."""

    type_code, struct = 3, struct.Struct(">h")


class Int32(_SizedInt):
    """Header type 4: a signed 32-bit integer (plain ints encode as this)."""

    type_code, struct = 4, struct.Struct(">i")


class Int64(_SizedInt):
    """Header type 5: a signed 64-bit integer."""

    type_code, struct = 5, struct.Struct(">q")


class Timestamp(_SizedInt):
    """Header type 8: milliseconds since the Unix epoch, signed 64-bit."""

    type_code, struct = 8, struct.Struct(">q")


HeaderValue = Union[bool, int, bytes, str, uuid.UUID]

_SIZED_INTS = {cls.type_code: cls for cls in (Int8, Int16, Int32, Int64, Timestamp)}

# type code -> what it carries (documentation and the encoder's reference)
HEADER_TYPES = {
    0: "bool true (no value bytes)",
    1: "bool false (no value bytes)",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "byte array: u16 length + bytes",
    7: "string: u16 length + UTF-8",
    8: "timestamp: int64 milliseconds since the epoch",
    9: "uuid: 16 bytes",
}


def decode_headers(block: bytes) -> dict[str, HeaderValue]:
    """Decode a whole header block; raises ``HeaderError`` on any fault."""
    headers: dict[str, HeaderValue] = {}
    end = len(block)
    pos = 0
    while pos < end:
        name_length = block[pos]
        pos += 1
        if name_length == 0:
            raise HeaderError(f"empty header name at header offset {pos - 1}")
        if pos + name_length + 1 > end:
            raise HeaderError(f"header name at offset {pos - 1} runs past the header block")
        try:
            name = block[pos : pos + name_length].decode("utf-8")
        except UnicodeDecodeError:
            raise HeaderError(f"header name at offset {pos - 1} is not UTF-8") from None
        pos += name_length
        type_code = block[pos]
        pos += 1
        value: HeaderValue
        if type_code == 7 or type_code == 6:  # string, byte array
            if pos + 2 > end:
                raise HeaderError(f"header {name!r}: value length runs past the header block")
            (length,) = _U16.unpack_from(block, pos)
            pos += 2
            if pos + length > end:
                raise HeaderError(
                    f"header {name!r}: {length}-byte value runs past the header block"
                )
            raw = block[pos : pos + length]
            pos += length
            if type_code == 7:
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise HeaderError(f"header {name!r}: string value is not UTF-8") from None
            else:
                value = bytes(raw)
        elif type_code in _SIZED_INTS:
            cls = _SIZED_INTS[type_code]
            size = cls.struct.size
            if pos + size > end:
                raise HeaderError(f"header {name!r}: {size}-byte value runs past the header block")
            value = cls(cls.struct.unpack_from(block, pos)[0])
            pos += size
        elif type_code == 0 or type_code == 1:
            value = type_code == 0
        elif type_code == 9:
            if pos + 16 > end:
                raise HeaderError(f"header {name!r}: uuid value runs past the header block")
            value = uuid.UUID(bytes=bytes(block[pos : pos + 16]))
            pos += 16
        else:
            raise HeaderError(f"header {name!r}: unknown value type {type_code}")
        if name in headers:
            raise HeaderError(f"duplicate header {name!r}")
        headers[name] = value
    return headers


def encode_headers(headers: Mapping[str, HeaderValue]) -> bytes:
    """Encode headers; plain ints become int32, sized ints keep their type."""
    out = bytearray()
    for name, value in headers.items():
        raw_name = name.encode("utf-8")
        if not 0 < len(raw_name) < 256:
            raise ValueError(f"header name must be 1..255 bytes: {name!r}")
        out.append(len(raw_name))
        out += raw_name
        if isinstance(value, bool):
            out.append(0 if value else 1)
        elif isinstance(value, int):
            sized = value if isinstance(value, _SizedInt) else Int32(value)
            try:
                packed = sized.struct.pack(sized)
            except struct.error:
                raise ValueError(f"header {name!r}: {value!r} is out of range") from None
            out.append(sized.type_code)
            out += packed
        elif isinstance(value, (bytes, bytearray, str)):
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            if len(raw) > 0xFFFF:
                raise ValueError(f"header {name!r}: value longer than 65535 bytes")
            out.append(7 if isinstance(value, str) else 6)
            out += _U16.pack(len(raw))
            out += raw
        elif isinstance(value, uuid.UUID):
            out.append(9)
            out += value.bytes
        else:
            raise TypeError(f"header {name!r}: cannot encode {type(value).__name__}")
    return bytes(out)


# Messages #################################################################


class Message(NamedTuple):
    """One decoded frame. ``headers`` is read-only."""

    headers: Mapping[str, HeaderValue]
    payload: bytes


def encode(headers: Mapping[str, HeaderValue], payload: bytes = b"") -> bytes:
    """Encode one frame (used by the tests and the demo upstream)."""
    block = encode_headers(headers)
    if len(block) > MAX_HEADERS_BYTES or len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError("header block or payload over the format's limits")
    total = MIN_FRAME_BYTES + len(block) + len(payload)
    prelude = _PRELUDE.pack(total, len(block), 0)[:8]
    prelude += _CRC.pack(zlib.crc32(prelude))
    body = prelude + block + payload
    return body + _CRC.pack(zlib.crc32(body))


class Decoder:
    """Incremental frame decoder: ``feed()`` bytes, iterate for messages.

    ``feed`` only buffers; iteration parses and yields each complete frame and
    stops when the next one has not fully arrived. Cost is linear in the bytes
    fed, whatever the chunking: consumed bytes are dropped from the front of
    the buffer once per iteration pass, not once per frame.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the next frame begins in _buffer
        self._offset = 0  # stream offset of _buffer[0], for error messages
        self._prelude: tuple[int, int, int] | None = None  # checked, frame incomplete
        self._error: EventStreamError | None = None
        self._closed = False
        self._header_cache: dict[bytes, Mapping[str, HeaderValue]] = {}
        self._ready: deque[Message] = deque()  # parsed, not yet handed out
        self._fed = False  # bytes arrived since the last parse

    def feed(self, data: bytes) -> None:
        """Append bytes that arrived; never parses and never raises a framing error."""
        if self._closed:
            raise RuntimeError("feed() after close()")
        if self._start:  # a caller that stopped iterating early
            self._compact()
        self._buffer += data
        self._fed = True

    def close(self) -> None:
        """Mark the end of the stream; raise if bytes are left over.

        Call it after iterating until no message comes out: any byte still
        buffered then belongs to a frame that never finished arriving.
        """
        self._closed = True
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._ready:
            raise RuntimeError("close() before every decoded message was read")
        left = len(self._buffer) - self._start
        if left:
            need = f" of {self._prelude[0]}" if self._prelude else ""
            self._fail(
                TruncatedStreamError(
                    f"stream ended inside a frame at stream offset "
                    f"{self._offset + self._start}: {left}{need} bytes arrived"
                )
            )

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        ready = self._ready
        if not ready:
            self._fill()
            if not ready:
                raise StopIteration
        return ready.popleft()

    def take(self) -> list[Message]:
        """Every message complete now, in one list: what iterating would yield,
        without a call per message (the proxy's per-read path).

        Like iteration, a framing error comes after the messages before it:
        they are returned, and this call raises it once none are left.
        """
        self._fill()
        messages = list(self._ready)
        self._ready.clear()
        return messages

    def _fill(self) -> None:
        """Parse what arrived since the last pass; raise the stream's framing error
        if no message is left before it."""
        # Nothing new since the last pass, nothing to find: the call that ends
        # each read's iteration costs no parse.
        if self._fed and self._error is None:
            self._parse()
        if not self._ready and self._error is not None:
            raise self._error.with_traceback(None)

    def _parse(self) -> None:
        """Parse every complete frame buffered into ``_ready``, then drop their bytes.

        A framing error stops the pass and is kept: the frames before it are
        still handed out first, and every later call raises it.
        """
        self._fed = False
        buffer, ready, cache = self._buffer, self._ready, self._header_cache
        start = self._start
        try:
            with memoryview(buffer) as view:  # released before the buffer is resized
                while True:
                    available = len(buffer) - start
                    prelude = self._prelude
                    if prelude is None:
                        if available < PRELUDE_BYTES:
                            break
                        # Every check of a prelude in one test, inline (this runs
                        # per frame); _reject_prelude says which one failed.
                        prelude = _PRELUDE.unpack_from(buffer, start)
                        total, headers_length, prelude_crc = prelude
                        if (zlib.crc32(view[start : start + 8]) != prelude_crc
                                or headers_length > MAX_HEADERS_BYTES
                                or not 0 <= total - MIN_FRAME_BYTES - headers_length
                                <= MAX_PAYLOAD_BYTES):
                            self._reject_prelude(buffer, start)
                    total, headers_length, prelude_crc = prelude
                    if available < total:
                        self._prelude = prelude
                        break
                    self._prelude = None
                    end = start + total - CRC_BYTES  # where the message CRC starts
                    body = start + PRELUDE_BYTES + headers_length  # where the payload starts
                    (expected,) = _CRC.unpack_from(buffer, end)
                    # The message CRC continues from the prelude CRC over bytes 8..end.
                    actual = zlib.crc32(view[start + 8 : end], prelude_crc)
                    if actual != expected:
                        self._fail(ChecksumError("message", expected=expected, actual=actual,
                                                 offset=self._offset + start))
                    block = bytes(view[start + PRELUDE_BYTES : body])
                    headers = cache.get(block)
                    if headers is None:
                        headers = self._decode_headers(block, start)
                    # One copy per frame: the payload's.
                    ready.append(Message(headers, bytes(view[body:end])))
                    start += total
        except EventStreamError:
            pass  # kept in self._error by _fail; raised once ``ready`` is empty
        finally:
            self._start = start
        if start:
            self._compact()

    def _decode_headers(self, block: bytes, start: int) -> Mapping[str, HeaderValue]:
        try:
            headers = MappingProxyType(decode_headers(block))
        except HeaderError as exc:
            self._fail(HeaderError(f"{exc} (frame at stream offset {self._offset + start})"))
        if (len(self._header_cache) < _HEADER_CACHE_ENTRIES
                and len(block) <= _HEADER_CACHE_BLOCK_BYTES):
            self._header_cache[block] = headers
        return headers

    def _reject_prelude(self, buffer: bytearray, start: int) -> NoReturn:
        """Fail with what is wrong with the prelude at ``start``, in the order a
        reader must check it: its CRC first, then the lengths it vouches for."""
        total, headers_length, expected = _PRELUDE.unpack_from(buffer, start)
        actual = zlib.crc32(buffer[start : start + 8])
        offset = self._offset + start
        if actual != expected:
            self._fail(ChecksumError("prelude", expected=expected, actual=actual, offset=offset))
        # Lengths are trusted only now that the prelude CRC has vouched for them.
        if total < MIN_FRAME_BYTES:
            self._fail(
                FrameLengthError(
                    f"frame at stream offset {offset} claims {total} bytes; "
                    f"the minimum is {MIN_FRAME_BYTES}"
                )
            )
        if headers_length > MAX_HEADERS_BYTES:
            self._fail(
                FrameLengthError(
                    f"frame at stream offset {offset} claims {headers_length} header "
                    f"bytes; the limit is {MAX_HEADERS_BYTES}"
                )
            )
        payload_length = total - MIN_FRAME_BYTES - headers_length
        if payload_length < 0:
            self._fail(
                FrameLengthError(
                    f"frame at stream offset {offset} claims {headers_length} header "
                    f"bytes in a {total}-byte frame"
                )
            )
        if payload_length > MAX_PAYLOAD_BYTES:
            self._fail(
                FrameLengthError(
                    f"frame at stream offset {offset} claims a {payload_length}-byte "
                    f"payload; the limit is {MAX_PAYLOAD_BYTES}"
                )
            )
        raise AssertionError("_reject_prelude called on a sound prelude")

    def _compact(self) -> None:
        # Drop consumed bytes once per pass, not per frame; deleting a prefix
        # of a bytearray only moves its start, so this is cheap.
        del self._buffer[: self._start]
        self._offset += self._start
        self._start = 0

    def _fail(self, error: EventStreamError) -> NoReturn:
        self._error = error
        raise error
