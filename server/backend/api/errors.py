"""Request validation errors as 422 answers that are always valid JSON.

FastAPI's own handler echoes each error's ``input``: a non-finite float there
(``1e999`` and ``NaN`` parse into floats) made rendering the 422 itself fail
with a 500, and a body refused as a whole was echoed back whole. Here inputs
pass through :func:`~attnscope.core.jsonsafe.json_safe` and large ones are left out.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import Request

from ...core.jsonsafe import json_safe

# An error's ``input`` is echoed when it is at most this long as JSON: enough for the
# value at fault, never a whole 16 MiB body.
MAX_ECHOED_INPUT = 1024


def _error(error: dict[str, Any]) -> dict[str, Any]:
    out = json_safe(jsonable_encoder(error))
    if "input" in out and len(json.dumps(out["input"])) > MAX_ECHOED_INPUT:
        del out["input"]
    return out


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 ``{"detail": [{"loc", "msg", "type", ...}]}``, as FastAPI answers it."""
    return JSONResponse(status_code=422, content={"detail": [_error(e) for e in exc.errors()]})
