"""Turning what a publisher has into what a job needs: model bytes and named input arrays.

A model is given as bytes or a path to an .onnx file (read here, on the publisher's own
machine: the model is the publisher's own and trusted; workers only ever get its bytes).
Inputs are a mapping name -> numpy array (samples on axis 0), a single array (for a model
with one input), an .npy/.npz file, or a list of files with a preprocessing function that
turns each file into one sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class InputError(ValueError):
    """The model or inputs cannot be used as given; the message says which and why."""


def load_model(model: bytes | str | Path) -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
    elif isinstance(model, (str, Path)):
        path = Path(model)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"model {path}: {exc.strerror or exc}") from None
    else:
        raise InputError(f"model must be bytes or a path to an .onnx file, not {type(model).__name__}")
    if not data:
        raise InputError("model is empty")
    return data


def model_input_names(model: bytes) -> list[str]:
    """The graph inputs a job must feed (inputs backed by an initializer are constants)."""
    import onnx

    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:  # noqa: BLE001 - protobuf raises assorted types
        raise InputError(f"model is not a readable ONNX model: {exc}") from None
    consts = {init.name for init in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in consts]


def load_inputs(inputs: Any, model: bytes, *,
                preprocess: Callable[[Path], Any] | None = None) -> dict[str, np.ndarray]:
    """Named arrays, samples on axis 0, all of one length. See the module docstring."""
    names = model_input_names(model)
    if isinstance(inputs, (str, Path)) and preprocess is None:
        inputs = _load_array_file(Path(inputs), names)
    elif isinstance(inputs, (str, Path)) or (isinstance(inputs, Sequence) and not isinstance(
            inputs, np.ndarray) and inputs and isinstance(inputs[0], (str, Path))):
        files = _expand_files(inputs)
        if preprocess is None:
            raise InputError("a list of files needs a preprocess function (file -> one sample)")
        inputs = _preprocess(files, preprocess, names)
    if isinstance(inputs, np.ndarray):
        if len(names) != 1:
            raise InputError(f"the model has {len(names)} inputs ({', '.join(names)}): give a "
                             "mapping name -> array")
        inputs = {names[0]: inputs}
    if not isinstance(inputs, Mapping) or not inputs:
        raise InputError("inputs must be a mapping name -> numpy array, an array, a .npy/.npz "
                         "file, or files with a preprocess function")
    out = {str(k): np.ascontiguousarray(v) for k, v in inputs.items()}
    missing = [n for n in names if n not in out]
    extra = [n for n in out if n not in names]
    if missing or extra:
        raise InputError(f"inputs do not match the model: missing {missing}, unknown {extra}; "
                         f"the model takes {names}")
    lengths = {n: a.shape[0] if a.ndim else 0 for n, a in out.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise InputError(f"every input needs the same number (>= 1) of samples on axis 0: {lengths}")
    return out


def _load_array_file(path: Path, names: list[str]) -> Any:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"inputs {path}: not a readable .npy/.npz file ({exc})") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        return {k: loaded[k] for k in loaded.files}


def _expand_files(spec: Any) -> list[Path]:
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"input file {p} does not exist")
    if not files:
        raise InputError("no input files found")
    return files


def _preprocess(files: list[Path], fn: Callable[[Path], Any], names: list[str]) -> dict[str, np.ndarray]:
    samples: list[Any] = []
    for f in files:
        try:
            samples.append(fn(f))
        except Exception as exc:  # noqa: BLE001 - the publisher's own function
            raise InputError(f"preprocess({f}) failed: {type(exc).__name__}: {exc}") from None
    first = samples[0]
    if isinstance(first, Mapping):
        return {k: np.stack([np.asarray(s[k]) for s in samples]) for k in first}
    if len(names) != 1:
        raise InputError(f"the model has {len(names)} inputs: preprocess must return a mapping")
    return {names[0]: np.stack([np.asarray(s) for s in samples])}
