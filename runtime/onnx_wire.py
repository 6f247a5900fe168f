"""Just enough of ONNX's protobuf wire format, without the `onnx` package, to check on a device what a bundle's graph
reads and runs (its interface, its operator domains, and whether any tensor points at data outside the model) and to
bake trained parameters into an inference model: the forward graph's `params` input becomes an initializer.

ModelProto.graph is field 7; GraphProto.initializer field 5, GraphProto.input field 11; ValueInfoProto.name and
TensorProto.name are fields 1 and 8; TensorProto.dims 1, data_type 2, raw_data 9 (onnx.proto3)."""

from __future__ import annotations

from dataclasses import dataclass

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


def _spans(data: bytes, start: int, end: int):
    """(field number, wire type, field start, content start, end) for each field of the message data[start:end],
    as offsets into `data` (nothing is copied); a length-delimited field's content is data[content start:end]. A
    field running past `end` raises ValueError."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _read_varint(data, pos)
        wire = key & 7
        content = pos
        if wire == _LENGTH:
            size, content = _read_varint(data, pos)
            pos = content + size
        elif wire == _VARINT:
            _, pos = _read_varint(data, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("a field runs past the end of its message")
        yield key >> 3, wire, first, content, pos


def fields(data: bytes) -> list[tuple[int, int, bytes]]:
    """(field number, wire type, raw bytes of the whole field) for each top-level field of a message."""
    return [(number, wire, data[first:stop]) for number, wire, first, _, stop in _spans(data, 0, len(data))]


def payload(field: bytes) -> bytes:
    """The content of a length-delimited field."""
    _, pos = _read_varint(field, 0)
    size, pos = _read_varint(field, pos)
    return field[pos:pos + size]


def _length_field(number: int, content: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH) + _varint(len(content)) + content


def _name(message: bytes, number: int) -> str | None:
    for field_number, wire, _, start, end in _spans(message, 0, len(message)):
        if field_number == number and wire == _LENGTH:
            return message[start:end].decode()
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


def float_initializers(model: bytes, names: set[str]) -> dict[str, np.ndarray]:
    """The float32 initializers `names` of a model (raw_data or packed float_data), as arrays."""
    found = {}
    for number, wire, raw in fields(model):
        if number != 7 or wire != _LENGTH:
            continue
        for g_number, g_wire, g_raw in fields(payload(raw)):
            if g_number == 5 and g_wire == _LENGTH and _name(payload(g_raw), 8) in names:
                name, array = _float_tensor_value(payload(g_raw))
                found[name] = array
    return found


def _float_tensor_value(tensor: bytes) -> tuple[str, np.ndarray]:
    dims, kind, name, data = [], _FLOAT, "", b""
    for number, wire, raw in fields(tensor):
        if number == 1 and wire == _VARINT:
            dims.append(_read_varint(raw, 1)[0])
        elif number == 1 and wire == _LENGTH:  # packed dims
            content, pos = payload(raw), 0
            while pos < len(content):
                value, pos = _read_varint(content, pos)
                dims.append(value)
        elif number == 2 and wire == _VARINT:
            kind = _read_varint(raw, 1)[0]
        elif number == 8 and wire == _LENGTH:
            name = payload(raw).decode()
        elif number in (4, 9) and wire == _LENGTH:
            data = payload(raw)
    if kind != _FLOAT:
        raise ValueError(f"initializer {name} is not float32")
    return name, np.frombuffer(data, "<f4").reshape(dims).copy()


# ---- what a graph reads and runs (checked before any engine sees it) -------------------------------------------
# ModelProto: opset_import 8 (OperatorSetIdProto.domain 1), graph 7, functions 25 (FunctionProto.node 7);
# GraphProto: node 1, initializer 5, input 11, output 12, sparse_initializer 15; NodeProto: domain 7, attribute 5;
# AttributeProto: t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23; SparseTensorProto: values 1,
# indices 2; TensorProto: external_data 13, data_location 14 (1 = EXTERNAL); ValueInfoProto: name 1, type 2;
# TypeProto.tensor_type 1 → elem_type 1, shape 2 → dim 1 → dim_value 1.

STANDARD_DOMAINS = ("", "ai.onnx")
ELEMENT_TYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 11: "float64", 9: "bool", 2: "uint8"}


@dataclass(frozen=True)
class GraphInterface:
    """A graph's inputs and outputs (name → (element type, dims; -1 where not fixed)), the names with an
    initializer, the operator domains it uses, and whether any tensor keeps its data outside the model."""

    inputs: dict[str, tuple[str, tuple[int, ...]]]
    outputs: dict[str, tuple[str, tuple[int, ...]]]
    initializers: frozenset[str]
    domains: frozenset[str]
    external_data: bool

    @property
    def required_inputs(self) -> list[str]:
        return [name for name in self.inputs if name not in self.initializers]


def graph_interface(model: bytes) -> GraphInterface:
    """Parse `model` (a serialized ModelProto) just far enough to say what it reads, runs and references; any
    malformed protobuf raises ValueError. It walks offsets into `model` and copies only names: a graph's weights
    are skipped, not read."""
    found = _Found(model)
    try:
        for number, wire, _, start, end in _spans(model, 0, len(model)):
            if wire != _LENGTH:
                continue
            if number == 7:
                found.graph(start, end, top=True)
            elif number == 8:
                found.domains.add(found.text(start, end, 1) or "")
            elif number == 25:
                for f_number, f_wire, _, f_start, f_end in _spans(model, start, end):
                    if f_number == 7 and f_wire == _LENGTH:
                        found.node(f_start, f_end)
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed protobuf ({type(exc).__name__})") from None
    return GraphInterface(found.inputs, found.outputs, frozenset(found.initializers), frozenset(found.domains),
                          found.external)


class _Found:
    """What graph_interface collects, walking messages as (start, end) spans of one serialized model."""

    def __init__(self, data: bytes):
        self.data = data
        self.inputs: dict = {}
        self.outputs: dict = {}
        self.initializers: set[str] = set()
        self.domains: set[str] = set()
        self.external = False

    def graph(self, start: int, end: int, top: bool = False) -> None:
        for number, wire, _, s, e in _spans(self.data, start, end):
            if wire != _LENGTH:
                continue
            if number == 1:
                self.node(s, e)
            elif number == 5:
                name = self.tensor(s, e)
                if top:
                    self.initializers.add(name)
            elif number == 15:
                self.sparse(s, e)
            elif top and number in (11, 12):
                name, typed = self.value_info(s, e)
                (self.inputs if number == 11 else self.outputs)[name] = typed

    def node(self, start: int, end: int) -> None:
        domain = ""
        for number, wire, _, s, e in _spans(self.data, start, end):
            if wire != _LENGTH:
                continue
            if number == 5:
                self.attribute(s, e)
            elif number == 7:
                domain = self.data[s:e].decode()
        self.domains.add(domain)

    def attribute(self, start: int, end: int) -> None:
        for number, wire, _, s, e in _spans(self.data, start, end):
            if wire != _LENGTH:
                continue
            if number in (5, 10):
                self.tensor(s, e)
            elif number in (6, 11):
                self.graph(s, e)
            elif number in (22, 23):
                self.sparse(s, e)

    def sparse(self, start: int, end: int) -> None:
        for number, wire, _, s, e in _spans(self.data, start, end):
            if number in (1, 2) and wire == _LENGTH:
                self.tensor(s, e)

    def tensor(self, start: int, end: int) -> str:
        """The tensor's name; notes whether it keeps its data outside the model."""
        name = ""
        for number, wire, _, s, e in _spans(self.data, start, end):
            if number == 13 or (number == 14 and wire == _VARINT and _read_varint(self.data, s)[0] != 0):
                self.external = True
            elif number == 8 and wire == _LENGTH:
                name = self.data[s:e].decode()
        return name

    def last(self, start: int, end: int, number: int, wire: int = _LENGTH) -> tuple[int, int] | None:
        """The span of the message's field `number` of type `wire` (the last one, as protobuf parsers read a
        repeated singular field); the whole message is checked."""
        found = [(s, e) for n, w, _, s, e in _spans(self.data, start, end) if n == number and w == wire]
        return found[-1] if found else None

    def text(self, start: int, end: int, number: int) -> str | None:
        span = self.last(start, end, number)
        return None if span is None else self.data[span[0]:span[1]].decode()

    def varint(self, start: int, end: int, number: int, default: int) -> int:
        span = self.last(start, end, number, _VARINT)
        return default if span is None else _read_varint(self.data, span[0])[0]

    def value_info(self, start: int, end: int) -> tuple[str, tuple[str, tuple[int, ...]]]:
        tensor_type = self.last(*(self.last(start, end, 2) or (start, start)), 1) or (start, start)
        element = self.varint(*tensor_type, 1, 0)
        dims = [self.varint(s, e, 1, -1) for n, w, _, s, e in
                _spans(self.data, *(self.last(*tensor_type, 2) or (start, start))) if n == 1 and w == _LENGTH]
        return self.text(start, end, 1) or "", (ELEMENT_TYPES.get(element, f"type {element}"), tuple(dims))


# ---- a trailing metadata entry (ModelProto.metadata_props, field 14: key 1, value 2) ------------------------------

def with_metadata(model: bytes, key: str, value: str) -> bytes:
    """`model` with one more metadata_props entry appended (engines ignore it)."""
    return model + _length_field(14, _length_field(1, key.encode()) + _length_field(2, value.encode()))


def trailing_metadata(model: bytes, key: str) -> tuple[bytes, str | None]:
    """(the bytes before the last field, its value) when the last field is metadata entry `key`, else (model, None)."""
    last = None
    try:
        for last in _spans(model, 0, len(model)):
            pass
    except (ValueError, IndexError):
        return model, None
    if last is None:
        return model, None
    number, wire, first, start, end = last
    entry = model[start:end]
    if number != 14 or wire != _LENGTH or _name(entry, 1) != key:
        return model, None
    return model[:first], _name(entry, 2)
