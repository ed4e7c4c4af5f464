"""The Open Inference Protocol's datatypes by TensorFlow dtype name: one table, imported by
the codec (``oip.py``) and by the pages (``pages.py``), which import no numpy."""

from __future__ import annotations

from typing import Final

__all__ = ["DATATYPES"]

#: TensorFlow dtype name -> the protocol's datatype.
DATATYPES: Final = {
    "bool": "BOOL",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "float16": "FP16",
    "bfloat16": "BF16",
    "float32": "FP32",
    "float64": "FP64",
    "string": "BYTES",
}
