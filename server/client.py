"""Python client of the captures API, and the ``attnscope capture`` command.

>>> from attnscope.client import Client                      # doctest: +SKIP
>>> with Client("http://127.0.0.1:8000") as client:        # doctest: +SKIP
...     arrays = client.capture("demo", [[1, 2, 3, 4]], kinds=["attention", "qkv"])
...     arrays["attention.0"].shape                          # (N, H, L, S)
(1, 4, 4, 4)

Tensor names: ``attention.i`` and ``qk_logits.i`` (N, h, L, S), ``queries.i``
(N, L, h, E), ``keys.i`` (N, S, h, E), ``values.i`` (N, S, h, D),
``intermediate.i`` (N, L, d_model), ``tokens`` (N, L); ``i`` is the layer.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

logger = logging.getLogger(__name__)
FORMATS = ("npz", "safetensors", "json")


class CaptureAPIError(RuntimeError):
    """The server refused a request; ``status`` is the HTTP status, ``detail`` its body."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {_describe(detail)}")


def _describe(detail: Any) -> str:
    """FastAPI error details as one line: ``body.tokens.0.1: token id 99 is ...``."""
    if isinstance(detail, dict) and "detail" in detail:
        detail = detail["detail"]
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', e)}"
            if isinstance(e, dict) else str(e) for e in detail)
    return str(detail)


class Capture(dict):
    """The tensors of one capture by name (numpy arrays or torch tensors).

    ``id`` and ``meta`` (the server's description: shapes, labels, urls...) ride along.
    """

    def __init__(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        super().__init__(arrays)
        self.meta = meta
        self.id: str = meta.get("id", "")


def _as_rows(value: Any, name: str) -> list:
    """Arrays/tensors to nested lists; a single sequence becomes a batch of one."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise TypeError(f"{name} must be a list or an array, got {type(value).__name__}")
    value = list(value)
    if value and not isinstance(value[0], list | tuple):
        value = [value]
    return value


def decode(content: bytes, fmt: str, as_torch: bool = False) -> dict[str, Any]:
    """Bytes of a ``/data`` download -> ``{name: numpy array}`` (or torch tensors)."""
    if fmt == "npz":
        with np.load(io.BytesIO(content), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    elif fmt == "safetensors":
        import safetensors.numpy

        arrays = safetensors.numpy.load(content)
    elif fmt == "json":
        tensors = json.loads(content)["tensors"]
        arrays = {k: np.array([np.nan if x is None else x for x in _flat(t["data"])],
                              dtype=t["dtype"]).reshape(t["shape"]) for k, t in tensors.items()}
    else:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if as_torch:
        import torch

        return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    return arrays


def _flat(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    for item in data:
        out.extend(_flat(item))
    return out


class Client:
    """Talks to an attnscope server: ``Client("http://127.0.0.1:8000", token=None)``.

    ``token`` is sent as ``Authorization: Bearer <token>`` (needed when the
    server listens on a non-loopback address). Every method raises
    :class:`CaptureAPIError` when the server refuses, with its message.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None,
                 timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json()
            except ValueError:
                detail = response.text
            raise CaptureAPIError(response.status_code, detail)
        return response

    def create(self, run: str, tokens: Any = None, *, text: str | Sequence[str] | None = None,
               features: Any = None, kinds: Sequence[str] = ("attention",),
               layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
               name: str | None = None, labels: Sequence[Any] | None = None) -> dict[str, Any]:
        """Ask for a capture; returns its metadata (id, tensors and shapes, urls).

        Give one input: ``tokens`` (N, L) or one sequence (L,) of token ids,
        ``text`` (a string or a list of strings), or ``features`` (N, L, d_model).
        """
        body: dict[str, Any] = {"run": run, "kinds": list(kinds)}
        if tokens is not None:
            body["tokens"] = _as_rows(tokens, "tokens")
        if text is not None:
            body["text"] = text if isinstance(text, str) else list(text)
        if features is not None:
            features = features.tolist() if hasattr(features, "tolist") else features
            body["features"] = [features] if features and not isinstance(
                features[0][0], list | tuple) else features
        for key, value in (("layers", layers), ("heads", heads), ("name", name),
                           ("labels", labels)):
            if value is not None:
                body[key] = value if isinstance(value, str) else list(value)
        return self._request("POST", "/api/v1/captures", json=body).json()

    def capture(self, run: str, tokens: Any = None, *, as_torch: bool = False,
                format: str = "npz", **kwargs: Any) -> Capture:
        """Create a capture and download it: ``{name: array}`` with ``.id`` and ``.meta``.

        Arguments as :meth:`create`; ``as_torch`` returns torch tensors;
        ``format`` picks the transfer encoding (npz or safetensors).
        """
        meta = self.create(run, tokens, **kwargs)
        return Capture(self.download(meta["id"], format=format, as_torch=as_torch), meta)

    def download(self, capture_id: str, format: str = "npz",
                 as_torch: bool = False) -> dict[str, Any]:
        """The tensors of a stored capture."""
        response = self._request("GET", f"/api/v1/captures/{capture_id}/data",
                                 params={"format": format})
        return decode(response.content, format, as_torch)

    def save(self, capture_id: str, path: str | os.PathLike, format: str | None = None) -> Path:
        """Stream a capture to ``path``; the format defaults to the path's suffix (npz)."""
        path = Path(path)
        fmt = format or (path.suffix.lstrip(".") if path.suffix.lstrip(".") in FORMATS else "npz")
        params = {"format": fmt}
        with self._http.stream("GET", f"/api/v1/captures/{capture_id}/data",
                               params=params) as response:
            if response.status_code >= 400:
                response.read()
                raise CaptureAPIError(response.status_code, _json_or_text(response))
            tmp = path.with_name(f".{path.name}.part")
            with open(tmp, "wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
            os.replace(tmp, path)
        return path

    def list(self, run: str | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
        """Stored captures' metadata, newest first (one page: ``limit`` from ``offset``)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if run is not None:
            params["run"] = run
        return self._request("GET", "/api/v1/captures", params=params).json()["items"]

    def get(self, capture_id: str) -> dict[str, Any]:
        """One capture's metadata."""
        return self._request("GET", f"/api/v1/captures/{capture_id}").json()

    def delete(self, capture_id: str) -> None:
        """Delete a capture."""
        self._request("DELETE", f"/api/v1/captures/{capture_id}")


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


# -- `attnscope capture` ------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def add_capture_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``attnscope capture`` (the CLI adds this as a subcommand)."""
    parser.add_argument("--url", default=os.environ.get("ATTNSCOPE_URL", "http://127.0.0.1:8000"),
                        help="server URL (env ATTNSCOPE_URL; default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("ATTNSCOPE_TOKEN"),
                        help="access token (env ATTNSCOPE_TOKEN)")
    parser.add_argument("--run", required=True, help="run id (see GET /api/v1/runs)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", action="append",
                        help='token ids of one sequence, e.g. "1 2 3"; repeat for a batch')
    source.add_argument("--text", action="append",
                        help="text in the run's symbols, e.g. ABCD; repeat for a batch")
    parser.add_argument("--kinds", default="attention",
                        help="comma-separated: attention, qkv, qk_logits, intermediate")
    parser.add_argument("--layers", type=_ints, default=None, help='e.g. "0 1" (default all)')
    parser.add_argument("--heads", type=_ints, default=None, help='e.g. "0 2" (default all)')
    parser.add_argument("--name", default=None, help="a name for the capture")
    parser.add_argument("--out", required=True, type=Path,
                        help="output file; .npz, .safetensors or .json picks the format")


def capture_command(args: argparse.Namespace) -> int:
    """Run ``attnscope capture``: create, download to ``--out``; 0 on success, 1 if refused."""
    suffix = args.out.suffix.lstrip(".")
    if suffix not in FORMATS:
        print(f"error: --out must end in one of {['.' + f for f in FORMATS]}, got {args.out}")
        return 2
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        with Client(args.url, token=args.token) as client:
            meta = client.create(
                args.run, [_ints(t) for t in args.tokens] if args.tokens else None,
                text=args.text, kinds=kinds, layers=args.layers, heads=args.heads,
                name=args.name)
            client.save(meta["id"], args.out, format=suffix)
    except CaptureAPIError as exc:
        print(f"error: {exc}")
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}")
        return 1
    shapes = ", ".join(f"{k} {tuple(v['shape'])}" for k, v in meta["tensors"].items())
    print(f"capture {meta['id']} -> {args.out}: {shapes}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m attnscope.client --run demo --tokens "1 2 3" --out a.npz``."""
    parser = argparse.ArgumentParser(prog="attnscope capture",
                                     description="Capture attention of a run into a file.")
    add_capture_arguments(parser)
    return capture_command(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
