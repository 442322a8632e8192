"""Form fields as the `openai` SDK writes objects into multipart bodies: `name[key]=value`
(its querystring `brackets` format), e.g. `input_reference[image_url]` for
`input_reference={"image_url": ...}`. Folded back into `{"name": {"key": value}}`, one level
deep, which is all the Videos API's objects need."""
from __future__ import annotations

import re

from wanserve.api.errors import InvalidRequest

_BRACKETED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\[([A-Za-z_][A-Za-z0-9_]*)\]$")


def nest_bracketed(fields: dict) -> dict:
    out = {key: value for key, value in fields.items() if not _BRACKETED.match(key)}
    for key, value in fields.items():
        match = _BRACKETED.match(key)
        if not match:
            continue
        name, inner = match.groups()
        if name in out and not isinstance(out[name], dict):
            raise InvalidRequest(f"`{name}` is given both as a value and as `{key}`", param=name,
                                 code="conflicting_parameters")
        out.setdefault(name, {})[inner] = value
    return out
