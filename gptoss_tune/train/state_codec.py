"""Pickle-free storage of training state (optimizer, scheduler, RNG): one safetensors file per object.

The tensors go into the safetensors body under the names "0", "1", ...; everything else is a JSON
skeleton in the header's metadata ("gptoss_tune.state": "1", "skeleton": JSON), where

    None, bool, str, int, float        themselves (float("inf"), float("nan") as {"float": "inf"} / {"float": "nan"})
    list                               a JSON array
    tuple                              {"tuple": [...]}
    dict (str or int keys)             {"dict": [[key, value], ...]}  (key types and order kept exactly)
    torch.Tensor                       {"tensor": "3"}
    numpy ndarray / scalar             {"ndarray": "4", "dtype": "<u4", "shape": [624], "scalar": false}  (raw bytes
                                       in a uint8 tensor: safetensors has no uint32, numpy's RNG state needs it)

Loading parses JSON and reads tensors, nothing else: a file that is not ours or is damaged raises
UserError naming it, never runs code (unlike torch.load(weights_only=False) on a .pt file).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptoss_tune.atomic_io import fsync_path
from gptoss_tune.errors import UserError

FORMAT_KEY = "gptoss_tune.state"
FORMAT_VERSION = "1"
_TAGS = {"float", "tuple", "dict", "tensor", "ndarray"}


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[str, int]] = set()

    def _add(self, t: torch.Tensor) -> str:
        t = t.detach().to("cpu").contiguous()
        key = (str(t.device), t.untyped_storage().data_ptr())
        if t.numel() and key in self._storages:  # safetensors refuses tensors sharing memory
            t = t.clone()
        self._storages.add(key)
        name = str(len(self.tensors))
        self.tensors[name] = t
        return name

    def encode(self, obj, where: str):
        if isinstance(obj, (np.ndarray, np.generic)):  # first: np.float64 is a float subclass
            arr = np.asarray(obj)
            if arr.dtype.kind not in "biuf":
                raise TypeError(f"state_codec: {where} is a numpy array of dtype {arr.dtype}, which is not stored")
            data = torch.from_numpy(np.frombuffer(np.ascontiguousarray(arr).tobytes(), dtype=np.uint8).copy())
            return {
                "ndarray": self._add(data),
                "dtype": arr.dtype.str,
                "shape": list(arr.shape),
                "scalar": isinstance(obj, np.generic),
            }
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"float": repr(obj)}
        if isinstance(obj, torch.Tensor):
            return {"tensor": self._add(obj)}
        if isinstance(obj, tuple):
            return {"tuple": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(
                        f"state_codec: {where} has a key {k!r} of type {type(k).__name__} (str or int only)"
                    )
                items.append([k if isinstance(k, str) else int(k), self.encode(v, f"{where}[{k!r}]")])
            return {"dict": items}
        raise TypeError(f"state_codec: {where} is a {type(obj).__name__}, which is not stored")


def save_state(obj, path: str | os.PathLike) -> int:
    """Write obj to path (through a temporary file in the same directory, fsynced, then renamed).
    Returns the bytes written. A value of a type not listed above is a TypeError (a bug, not a user error)."""
    path = Path(path)
    enc = _Encoder()
    skeleton = enc.encode(obj, "state")
    meta = {FORMAT_KEY: FORMAT_VERSION, "skeleton": json.dumps(skeleton, separators=(",", ":"), allow_nan=False)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(enc.tensors, str(tmp), metadata=meta)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path.stat().st_size


class _Malformed(ValueError):
    pass


class _Decoder:
    def __init__(self, f, names: set[str]):
        self.f, self.names, self.used = f, names, set()

    def _tensor(self, name) -> torch.Tensor:
        if not isinstance(name, str) or name not in self.names:
            raise _Malformed(f"the skeleton names a tensor {name!r} that the file does not hold")
        if name in self.used:
            raise _Malformed(f"tensor {name!r} is used twice")
        self.used.add(name)
        return self.f.get_tensor(name)

    def decode(self, v):
        if v is None or isinstance(v, (bool, str, int, float)):
            return v
        if isinstance(v, list):
            return [self.decode(x) for x in v]
        if not isinstance(v, dict) or len(set(v) & _TAGS) != 1:
            raise _Malformed(f"unexpected value {str(v)[:60]!r}")
        (tag,) = set(v) & _TAGS
        if tag == "ndarray":
            return self._ndarray(v)
        if len(v) != 1:
            raise _Malformed(f"unexpected keys {sorted(v)} in a {tag!r} entry")
        x = v[tag]
        if tag == "float":
            if x not in ("inf", "-inf", "nan"):
                raise _Malformed(f"float {x!r} is not inf, -inf or nan")
            return float(x)
        if tag == "tensor":
            return self._tensor(x)
        if not isinstance(x, list):
            raise _Malformed(f"a {tag!r} entry holds {type(x).__name__}, not a list")
        if tag == "tuple":
            return tuple(self.decode(e) for e in x)
        out = {}
        for item in x:
            if not (isinstance(item, list) and len(item) == 2) or isinstance(item[0], bool):
                raise _Malformed("a dict entry is not a [key, value] pair")
            if not isinstance(item[0], (str, int)):
                raise _Malformed(f"a dict key {item[0]!r} is neither str nor int")
            out[item[0]] = self.decode(item[1])
        return out

    def _ndarray(self, v):
        if set(v) != {"ndarray", "dtype", "shape", "scalar"}:
            raise _Malformed(f"unexpected keys {sorted(v)} in an ndarray entry")
        dtype = np.dtype(v["dtype"]) if isinstance(v["dtype"], str) else None
        shape = v["shape"]
        if dtype is None or dtype.kind not in "biuf":
            raise _Malformed(f"ndarray dtype {v['dtype']!r} is not a plain number type")
        if not (
            isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise _Malformed(f"ndarray shape {shape!r} is not a list of sizes")
        raw = self._tensor(v["ndarray"])
        if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != math.prod(shape) * dtype.itemsize:
            raise _Malformed(f"ndarray of {v['dtype']} {shape} does not match its {raw.numel()} bytes")
        arr = np.frombuffer(raw.cpu().numpy().tobytes(), dtype=dtype).reshape(shape).copy()
        return arr[()] if v["scalar"] is True else arr


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Read what save_state wrote. Anything else (a pickle, a torn or edited file, another safetensors file)
    raises UserError naming the file; nothing in the file is executed."""
    path = Path(path)
    what = "resume from another checkpoint (or start over with resume=never overwrite=true)"
    if not path.is_file():
        raise UserError(f"{path}: missing; the checkpoint is incomplete: {what}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get(FORMAT_KEY) != FORMAT_VERSION or not isinstance(meta.get("skeleton"), str):
                raise _Malformed(f"no {FORMAT_KEY} metadata (version {FORMAT_VERSION})")
            dec = _Decoder(f, set(f.keys()))
            obj = dec.decode(json.loads(meta["skeleton"]))
            if dec.used != dec.names:
                raise _Malformed(f"{len(dec.names - dec.used)} tensor(s) not named by the skeleton")
            return obj
    except _Malformed as e:
        raise UserError(f"{path}: not a gptoss-tune state file ({e}); {what}") from None
    except Exception as e:
        # safetensors' SafetensorError (a torn or foreign file), JSON errors, nesting beyond the stack
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{path}: unreadable as a gptoss-tune state file ({reason}); {what}") from None
