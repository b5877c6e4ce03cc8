"""What an onnxruntime session's inputs take: feeds cast to the float type each input
declares, and whether two sessions take the same inputs."""
from __future__ import annotations

import numpy as np

from .errors import InputError


_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
           "tensor(double)": np.float64}


def typed_feeds(session, feeds: dict) -> dict:
    """`feeds` with each floating-point array in the float type the session's input
    declares (images are prepared in float32; a float16 model takes float16)."""
    declared = {i.name: _FLOATS.get(i.type) for i in session.get_inputs()}
    return {k: (v.astype(declared[k]) if declared.get(k) is not None
                and isinstance(v, np.ndarray) and v.dtype.kind == "f"
                and v.dtype != declared[k] else v) for k, v in feeds.items()}


def check_same_inputs(a, b, where_a: str, where_b: str) -> None:
    """Sessions `a` and `b` take the same inputs: names, ranks and fixed sizes (float types
    may differ: feeds are cast, ``typed_feeds``); InputError otherwise."""
    def spec(session):
        return [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]

    def fits(x, y) -> bool:
        (name_x, type_x, shape_x), (name_y, type_y, shape_y) = x, y
        return (name_x == name_y and (type_x == type_y or (type_x in _FLOATS
                                                           and type_y in _FLOATS))
                and len(shape_x) == len(shape_y)
                and all(not (isinstance(p, int) and isinstance(q, int)) or p == q
                        for p, q in zip(shape_x, shape_y)))

    sa, sb = spec(a), spec(b)
    if len(sa) != len(sb) or not all(fits(x, y) for x, y in zip(sa, sb)):
        def text(s):
            return ", ".join(f"{n} {t[7:-1]} {[d if isinstance(d, int) else '?' for d in sh]}"
                             for n, t, sh in s)
        raise InputError(f"{where_b} does not take the inputs of {where_a} ({text(sb)} "
                         f"against {text(sa)}) - compare a model with a pruned or grown "
                         "version of itself")
