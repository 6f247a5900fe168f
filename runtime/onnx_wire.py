"""Just enough of ONNX's protobuf wire format to bake trained parameters into an inference model on a device
without the `onnx` package: the forward graph's `params` input becomes an initializer holding the trained values.

ModelProto.graph is field 7; GraphProto.initializer field 5, GraphProto.input field 11; ValueInfoProto.name and
TensorProto.name are fields 1 and 8; TensorProto.dims 1, data_type 2, raw_data 9 (onnx.proto3)."""

from __future__ import annotations

import numpy as np

_VARINT, _LENGTH = 0, 2
_FLOAT = 1  # TensorProto.FLOAT


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(data: bytes) -> list[tuple[int, int, bytes]]:
    """(field number, wire type, raw bytes of the whole field) for each top-level field of a message."""
    out, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _read_varint(data, pos)
        elif wire == _LENGTH:
            size, pos = _read_varint(data, pos)
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, wire, data[start:pos]))
    return out


def payload(field: bytes) -> bytes:
    """The content of a length-delimited field."""
    _, pos = _read_varint(field, 0)
    size, pos = _read_varint(field, pos)
    return field[pos:pos + size]


def _length_field(number: int, content: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH) + _varint(len(content)) + content


def _name(message: bytes, number: int) -> str | None:
    for field_number, wire, raw in fields(message):
        if field_number == number and wire == _LENGTH:
            return payload(raw).decode()
    return None


def float_tensor(name: str, array: np.ndarray) -> bytes:
    """A TensorProto with raw little-endian float32 data."""
    body = b"".join(_varint(1 << 3 | _VARINT) + _varint(int(d)) for d in array.shape)
    body += _varint(2 << 3 | _VARINT) + _varint(_FLOAT)
    body += _length_field(8, name.encode())
    body += _length_field(9, np.ascontiguousarray(array, "<f4").tobytes())
    return body


def bake_input(model: bytes, name: str, value: np.ndarray) -> bytes:
    """`model` with graph input `name` replaced by an initializer of that name holding `value`."""
    out = bytearray()
    for number, wire, raw in fields(model):
        if number != 7 or wire != _LENGTH:
            out += raw
            continue
        graph = bytearray()
        for g_number, g_wire, g_raw in fields(payload(raw)):
            if g_number == 11 and _name(payload(g_raw), 1) == name:
                continue
            graph += g_raw
        graph += _length_field(5, float_tensor(name, value))
        out += _length_field(7, bytes(graph))
    return bytes(out)
