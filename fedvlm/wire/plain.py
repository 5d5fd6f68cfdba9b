"""Protocol messages as plain Python data: one document whatever side of the wire it was built on.

`json_format.MessageToDict` follows the proto3 JSON mapping, which writes 64-bit integers as strings and leaves out
fields that proto3 cannot tell from their defaults unless told otherwise; a status read from state.db and the
same status received over the Admin RPC would then differ in types. This walks the descriptor instead: every field
is present, integers stay integers, maps become dicts and repeated fields lists.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def message_to_plain(message: Message) -> dict[str, Any]:
    """Every field of `message` by its proto name (set or not), with messages, maps and lists converted in turn."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _scalar_or_message(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_scalar_or_message(field, v) for v in value]
        else:
            out[field.name] = _scalar_or_message(field, value)
    return out


def _scalar_or_message(field: FieldDescriptor, value: Any) -> Any:
    return message_to_plain(value) if field.type == FieldDescriptor.TYPE_MESSAGE else value
