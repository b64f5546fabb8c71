"""torch's dtypes and devices in a configuration held by a process without torch.

The server's front end imports no torch (~200 MB it would hold only to tokenize, route and
detokenize), yet it holds the engine's ResolvedConfig, whose dtypes and devices are torch's, and
passes it on to the engine cores. The process that resolves the configuration pickles it with
`dumps`, each such value by name; unpickled where torch is imported, the name is torch's value
again, and elsewhere a TorchName, which pickles back into torch's value the same way."""

from __future__ import annotations

import io
import pickle
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TorchName:
    """A torch dtype ("float32") or device ("cuda:0") in a process without torch."""

    kind: str  # "dtype" or "device"
    name: str

    @property
    def type(self) -> str:
        """A device's type, as torch.device.type: "cpu", "cuda"."""
        return self.name.partition(":")[0]

    def __str__(self) -> str:
        return f"torch.{self.name}" if self.kind == "dtype" else self.name

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return torch_value, (self.kind, self.name)


def torch_value(kind: str, name: str) -> Any:
    """torch's dtype or device of this name where torch is imported, else its TorchName."""
    torch = sys.modules.get("torch")
    if torch is None:
        return TorchName(kind, name)
    return getattr(torch, name) if kind == "dtype" else torch.device(name)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.dtype):
            return torch_value, ("dtype", str(obj).removeprefix("torch."))
        if torch is not None and isinstance(obj, torch.device):
            return torch_value, ("device", str(obj))
        return NotImplemented


class _NamesUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return TorchName if (module, name) == (__name__, "torch_value") else super().find_class(module, name)


def loads_names(data: bytes) -> Any:
    """pickle.loads of what `dumps` pickled, each torch value a TorchName whether or not torch is
    imported here: the server's front end unpickles its configuration while a thread of it may be
    importing torch (transformers 5.17's tokenizer classes import it), half-imported meanwhile."""
    return _NamesUnpickler(io.BytesIO(data)).load()


def dumps(obj: Any) -> bytes:
    """pickle.dumps, with torch's dtypes and devices by name (module docstring)."""
    buffer = io.BytesIO()
    _Pickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()
