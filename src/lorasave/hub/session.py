"""How ``lorasave.hub.push`` talks to the Hub: a bounded wait per request, and one-line errors.

``HubSession`` is installed around a push: huggingface_hub's shared HTTP client (``httpx2`` in
huggingface_hub 2.x, built by the factory ``set_client_factory`` takes) gets a timeout on every
request, ``LORASAVE_HUB_TIMEOUT`` seconds (default 120: connect, each read and each write; not the
whole transfer), including requests huggingface_hub sends with ``timeout=None``; and the last
response is remembered, so an answer that is not the Hub's JSON API (an HTML page from a proxy, a
captive portal or a website at ``HF_ENDPOINT``) can be reported with its status. The previous
client factory is restored afterwards. Xet transfers (``hf_xet``) keep their own timeouts.

``mapped_hub_errors`` turns what huggingface_hub, the HTTP stack and hf_xet raise into one-line
``HubError`` subclasses, every server message scrubbed of tokens (``lorasave.util.redact``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from lorasave.errors import HubAuthError, HubError, HubNotFoundError, InvalidOptionError, LorasaveError, ModelCardError
from lorasave.util.redact import scrub

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "LORASAVE_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 120.0  # seconds without progress on one request
_MAX_SERVER_MESSAGE = 200  # characters of a server message quoted in an error


def hub_timeout() -> float:
    """Seconds lorasave waits for the Hub on one request: ``LORASAVE_HUB_TIMEOUT``, default 120.

    Raises:
        InvalidOptionError: the variable is set to something other than a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidOptionError(
            f"{TIMEOUT_ENV}={raw!r} is not a number of seconds: give a positive number such as 300, or unset it for the default {DEFAULT_TIMEOUT:g}"
        )
    return value


def one_line(text: str, token: str | None, *, limit: int = _MAX_SERVER_MESSAGE) -> str:
    """``text`` scrubbed of tokens, on one line, at most ``limit`` characters."""
    text = " ".join(scrub(text, [token]).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Seen:
    """The last response huggingface_hub received (before its body was read)."""

    method: str
    path: str
    status: int
    content_type: str

    def describe(self) -> str:
        reason = HTTPStatus(self.status).phrase if self.status in HTTPStatus._value2member_map_ else ""
        return f"{self.status} {reason}".strip()


class HubSession:
    """Context manager: huggingface_hub's shared client with a timeout and a record of the last response.

    Attributes:
        timeout: seconds per request.
        step: what the push is doing now, for messages ("creating the repository").
        last: the last response received, or None.
    """

    def __init__(self, timeout: float, endpoint: str) -> None:
        self.timeout = timeout
        self.endpoint = endpoint
        self.step = "talking to the Hub"
        self.last: _Seen | None = None
        self._previous: Any = None

    def __enter__(self) -> HubSession:
        from huggingface_hub.utils import _http

        if not hasattr(_http, "set_client_factory"):  # huggingface_hub < 1.0 (requests): its own defaults apply
            logger.debug("huggingface_hub %s has no set_client_factory: %s not applied", getattr(_http, "__name__", "?"), TIMEOUT_ENV)
            return self
        self._previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory
        _http.set_client_factory(self._factory)  # closes the current shared client
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            from huggingface_hub.utils import _http

            _http.set_client_factory(self._previous)

    def _factory(self) -> Any:
        import importlib

        client = self._previous()
        http = importlib.import_module(type(client).__module__.split(".")[0])  # httpx2 (huggingface_hub 2.x) or httpx (1.x)
        client.timeout = http.Timeout(self.timeout)
        hooks = client.event_hooks
        hooks["request"] = [*hooks.get("request", []), self._on_request]
        hooks["response"] = [*hooks.get("response", []), self._on_response]
        client.event_hooks = hooks
        return client

    def _on_request(self, request: Any) -> None:
        # huggingface_hub passes timeout=None (wait forever) on some calls: bound those too
        current = request.extensions.get("timeout") or {}
        bounded = {k: (v if v is not None else self.timeout) for k, v in current.items()} or dict.fromkeys(("connect", "read", "write", "pool"), self.timeout)
        request.extensions = {**request.extensions, "timeout": bounded}

    def _on_response(self, response: Any) -> None:
        request = response.request
        self.last = _Seen(str(request.method), str(request.url.path), int(response.status_code), response.headers.get("content-type", ""))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception classes of the HTTP stacks huggingface_hub may use (httpx2 in 2.x, httpx in 1.x, requests before)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)), ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        found.extend(getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type))
    return tuple(found)


def _timeout_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [TimeoutError]
    for module, name in (("httpx2", "TimeoutException"), ("httpx", "TimeoutException"), ("requests", "Timeout")):
        try:
            cls = getattr(__import__(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _not_the_api(endpoint: str, where: str, code: str, step: str) -> str:
    return (
        f"{endpoint} answered {where} with an HTML page ({code}) instead of the Hub's JSON API while {step}: "
        "check HF_ENDPOINT (unset it for https://huggingface.co), a proxy or a network login page; then re-run the push"
    )


def _http_error(e: Any, repo_id: str, revision: str | None, token: str | None, session: HubSession) -> HubError:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    try:
        request = response.request if response is not None else None
        where = f"{request.method} {request.url.path}" if request is not None else "a Hub request"
    except (AttributeError, RuntimeError):
        where = "a Hub request"
    reason = getattr(response, "reason_phrase", None) or getattr(response, "reason", None)
    if not reason and status is not None and status in HTTPStatus._value2member_map_:
        reason = HTTPStatus(status).phrase
    code = f"{status} {reason or ''}".strip()
    content_type = str(getattr(response, "headers", {}).get("content-type", "")) if response is not None else ""
    if "html" in content_type.lower():  # the Hub's API answers JSON: this came from something else
        return HubError(_not_the_api(session.endpoint, where, code, session.step), repo_id=repo_id, status=status)
    server = one_line(getattr(e, "server_message", None) or "", token)
    said = f": {server}" if server else ""
    ns = repo_id.split("/")[0] if "/" in repo_id else "your"
    if status == 401:
        return HubAuthError(
            f"the Hub rejected the token ({code}{said}): set HF_TOKEN to a valid token with write access or run `hf auth login`", repo_id=repo_id, status=status
        )
    if status == 403:
        return HubAuthError(
            f"the token may not write to {repo_id} ({code}{said}): use a token with write access to the {ns} namespace", repo_id=repo_id, status=status
        )
    if isinstance(e, RevisionNotFoundError):
        return HubNotFoundError(
            f"revision {revision!r} not found in {repo_id} ({code}{said}): give a branch name (it is created from main)", repo_id=repo_id, status=status
        )
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        return HubNotFoundError(
            f"{repo_id} not found on the Hub ({where}: {code}{said}): check the repo id and that the token can see it", repo_id=repo_id, status=status
        )
    if status is not None and status >= 500:
        return HubError(
            f"the Hub failed on {where} ({code}{said}): try again later; re-running the push skips files already committed", repo_id=repo_id, status=status
        )
    return HubError(f"the Hub refused {where} ({code}{said})", repo_id=repo_id, status=status)


@contextmanager
def mapped_hub_errors(repo_id: str, revision: str | None, token: str | None, endpoint: str) -> Iterator[HubSession]:
    """Run Hub calls in a ``HubSession``; turn huggingface_hub / HTTP / hf_xet exceptions into one-line lorasave errors.

    Yields the session: set ``session.step`` to say what the push waits for.

    Raises:
        InvalidOptionError: ``LORASAVE_HUB_TIMEOUT`` is not a positive number.
        HubError and subclasses, ModelCardError: as ``lorasave.hub.push.push`` documents.
    """
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    session = HubSession(hub_timeout(), endpoint)
    try:
        with session:
            yield session
    except LorasaveError:
        raise
    except HfHubHTTPError as e:
        raise _http_error(e, repo_id, revision, token, session) from e
    except OfflineModeIsEnabled as e:
        raise HubError("Hugging Face offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE): unset it to push", repo_id=repo_id) from e
    except PermissionError as e:
        if type(e).__module__.startswith("hf_xet"):  # XetAuthenticationError
            raise HubAuthError(
                f"the Hub's storage rejected the upload token ({one_line(str(e), token)}): check that the token has write access", repo_id=repo_id
            ) from e
        raise
    except json.JSONDecodeError as e:  # a 2xx answer that is not JSON
        seen = session.last
        if seen is None:
            raise HubError(f"the Hub's answer while {session.step} is not JSON ({e}): check HF_ENDPOINT and re-run the push", repo_id=repo_id) from e
        where = f"{seen.method} {seen.path}"
        if "html" in seen.content_type.lower():
            raise HubError(_not_the_api(endpoint, where, seen.describe(), session.step), repo_id=repo_id, status=seen.status) from e
        raise HubError(
            f"{endpoint} answered {where} ({seen.describe()}, {seen.content_type or 'no content type'}) with something that is not JSON while {session.step}: "
            "check HF_ENDPOINT and re-run the push",
            repo_id=repo_id,
            status=seen.status,
        ) from e
    except ValueError as e:
        if "Invalid metadata in README.md" in str(e):  # upload_folder's own README check
            raise ModelCardError(f"README.md: the Hub refuses the model card metadata ({one_line(str(e), token)})") from e
        raise
    except _timeout_errors() as e:
        try:
            request = e.request  # type: ignore[union-attr]
            what = f"{request.method} {request.url.path}"
        except (AttributeError, RuntimeError):  # httpx raises RuntimeError when no request is attached
            what = "an answer"
        raise HubError(
            f"no answer from the Hub at {endpoint} within {session.timeout:g} s while {session.step} (waiting for {what}): "
            f"check the network or a proxy, or raise {TIMEOUT_ENV} (seconds); re-running the push resumes it",
            repo_id=repo_id,
        ) from e
    except _transport_errors() as e:
        detail = f"{type(e).__name__}: {one_line(str(e), token) or 'no details'}"
        fix = "check the network, a proxy or HF_ENDPOINT; re-running the push resumes it"
        raise HubError(f"cannot reach the Hub at {endpoint} while {session.step} ({detail}): {fix}", repo_id=repo_id) from e
    except RuntimeError as e:
        if type(e).__module__.startswith("hf_xet"):
            raise HubError(
                f"the Xet upload failed ({one_line(str(e), token)}): re-run the push; data already uploaded is not sent again", repo_id=repo_id
            ) from e
        raise
