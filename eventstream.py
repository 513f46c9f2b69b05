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
types are: 0 and 1 bool true and false (no value bytes), 2 to 5 signed
integers of 1, 2, 4 and 8 bytes, 6 a byte array and 7 a UTF-8 string (each a
u16 length and the bytes), 8 a timestamp (int64 milliseconds since the
epoch), 9 a UUID (16 bytes).

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

def _header_name(block: bytes, pos: int, end: int) -> str:
    """The name of the header at ``pos`` (its length byte); the type byte must follow."""
    name_length = block[pos]
    if name_length == 0:
        raise HeaderError(f"empty header name at header offset {pos}")
    if pos + 1 + name_length + 1 > end:
        raise HeaderError(f"header name at offset {pos} runs past the header block")
    try:
        return block[pos + 1 : pos + 1 + name_length].decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError(f"header name at offset {pos} is not UTF-8") from None


def _header_value(block: bytes, pos: int, end: int, name: str,
                  type_code: int) -> tuple[HeaderValue, int]:
    """The value of type ``type_code`` at ``pos``, and where the next header starts."""
    if type_code == 7 or type_code == 6:  # string, byte array: u16 length, then the bytes
        if pos + 2 > end:
            raise HeaderError(f"header {name!r}: value length runs past the header block")
        (length,) = _U16.unpack_from(block, pos)
        pos += 2
        if pos + length > end:
            raise HeaderError(f"header {name!r}: {length}-byte value runs past the header block")
        raw = block[pos : pos + length]
        if type_code == 6:
            return bytes(raw), pos + length
        try:
            return raw.decode("utf-8"), pos + length
        except UnicodeDecodeError:
            raise HeaderError(f"header {name!r}: string value is not UTF-8") from None
    if type_code == 0 or type_code == 1:
        return type_code == 0, pos
    if type_code == 9:
        size, cls = 16, None
    elif type_code in _SIZED_INTS:
        cls = _SIZED_INTS[type_code]
        size = cls.struct.size
    else:
        raise HeaderError(f"header {name!r}: unknown value type {type_code}")
    if pos + size > end:
        what = "uuid" if cls is None else f"{size}-byte"
        raise HeaderError(f"header {name!r}: {what} value runs past the header block")
    if cls is None:
        return uuid.UUID(bytes=bytes(block[pos : pos + 16])), pos + 16
    return cls(cls.struct.unpack_from(block, pos)[0]), pos + size


def decode_headers(block: bytes) -> dict[str, HeaderValue]:
    """Decode a whole header block; raises ``HeaderError`` on any fault."""
    headers: dict[str, HeaderValue] = {}
    end = len(block)
    pos = 0
    while pos < end:
        name = _header_name(block, pos, end)
        pos += 1 + block[pos]
        value, pos = _header_value(block, pos + 1, end, name, block[pos])
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


def _length_error(total: int, headers_length: int, offset: int) -> FrameLengthError:
    """Word what is wrong with the lengths of a prelude the decoder refused."""
    payload_length = total - MIN_FRAME_BYTES - headers_length
    if total < MIN_FRAME_BYTES:
        why = f"claims {total} bytes; the minimum is {MIN_FRAME_BYTES}"
    elif headers_length > MAX_HEADERS_BYTES:
        why = f"claims {headers_length} header bytes; the limit is {MAX_HEADERS_BYTES}"
    elif payload_length < 0:
        why = f"claims {headers_length} header bytes in a {total}-byte frame"
    else:
        why = f"claims a {payload_length}-byte payload; the limit is {MAX_PAYLOAD_BYTES}"
    return FrameLengthError(f"frame at stream offset {offset} {why}")


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
                        # The one check of a prelude, inline because it runs per
                        # frame: its CRC first, then the lengths it vouches for.
                        prelude = _PRELUDE.unpack_from(buffer, start)
                        total, headers_length, prelude_crc = prelude
                        actual = zlib.crc32(view[start : start + 8])
                        if actual != prelude_crc:
                            self._fail(ChecksumError("prelude", expected=prelude_crc,
                                                     actual=actual, offset=self._offset + start))
                        if (headers_length > MAX_HEADERS_BYTES
                                or not 0 <= total - MIN_FRAME_BYTES - headers_length
                                <= MAX_PAYLOAD_BYTES):
                            self._fail(_length_error(total, headers_length,
                                                     self._offset + start))
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

    def _compact(self) -> None:
        # Drop consumed bytes once per pass, not per frame; deleting a prefix
        # of a bytearray only moves its start, so this is cheap.
        del self._buffer[: self._start]
        self._offset += self._start
        self._start = 0

    def _fail(self, error: EventStreamError) -> NoReturn:
        self._error = error
        raise error
