"""RFC 7396 JSON merge patch, applied directly to ``google.protobuf.Struct``."""

from __future__ import annotations

from google.protobuf import struct_pb2


def merge_patch(target: struct_pb2.Struct, patch: struct_pb2.Struct) -> None:
    """Applies ``patch`` to ``target`` in place.

    Objects merge recursively; a null removes the key; anything else (lists
    included) replaces the value that was there.
    """
    for key, value in patch.fields.items():
        kind = value.WhichOneof("kind")
        if kind == "null_value":
            if key in target.fields:
                del target.fields[key]
        elif kind == "struct_value":
            existing = target.fields.get(key)
            if existing is None or existing.WhichOneof("kind") != "struct_value":
                target.fields[key].struct_value.SetInParent()
            merge_patch(target.fields[key].struct_value, value.struct_value)
        else:
            target.fields[key].CopyFrom(value)
