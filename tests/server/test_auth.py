"""Auth as Jupyter does it: token settings, bearer / query-then-cookie, Origin, no leaks."""

from __future__ import annotations

import httpx
import pytest
from auth_support import BEARER, TOKEN, log_of, ws_status
from pydantic import ValidationError
from stream_support import Served

from attnscope.backend.auth import COOKIE_NAME
from attnscope.settings import Settings
from attnscope.training.run import RunRegistry


@pytest.fixture(scope="module")
def served() -> Served:
    with Served(RunRegistry(), token=TOKEN) as s:
        yield s


def test_loopback_needs_no_token_by_default() -> None:
    assert Settings().token_value is None
    with Served(RunRegistry()) as served:
        assert served.http.get("/api/v1/runs").status_code == 200
        assert ws_status(served.ws_url) == 101


def test_public_bind_generates_a_token() -> None:
    settings = Settings(host="0.0.0.0")
    assert settings.token_generated
    assert len(settings.token_value) >= 32
    assert Settings(host="0.0.0.0").token_value != settings.token_value
    assert TOKEN not in repr(Settings(token=TOKEN))  # never shown by accident


@pytest.mark.parametrize("host, token, message", [
    ("0.0.0.0", "", "empty token is refused"),
    ("127.0.0.1", "short", "at least 16 characters"),
    ("0.0.0.0", "has a space in it, long enough", "without spaces"),
])
def test_bad_tokens_fail_at_start_naming_the_field(host: str, token: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        Settings(host=host, token=token)
    assert "token" in str(info.value)


def test_cli_serve_prints_a_login_url(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from attnscope import cli

    ran = []
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets: ran.append(sockets))
    monkeypatch.delenv("ATTNSCOPE_TOKEN", raising=False)
    assert cli.main(["serve", "--port", "0", "--host", "0.0.0.0"]) == 0
    assert ran
    # A generated token is printed in the URL (a user-supplied one never is:
    # test_hardening.py::test_user_token_is_never_printed_generated_one_is).
    assert "/?token=" in capsys.readouterr().out


def test_missing_or_wrong_token_is_401_without_detail(served: Served) -> None:
    get = served.http.get
    responses = [get("/api/v1/runs"), get("/api/v1/runs", headers={"Authorization": "Bearer x"}),
                 get("/api/v1/runs", headers={"Authorization": f"Bearer {TOKEN[:-1]}"}),
                 get("/api/v1/runs?token=nope")]
    for response in responses:
        assert response.status_code == 401
        assert response.json() == {"detail": "authentication required"}
        assert response.headers["www-authenticate"] == "Bearer"


def test_health_is_open(served: Served) -> None:
    assert served.http.get("/api/v1/health").json()["status"] == "ok"


def test_bearer_header(served: Served) -> None:
    response = served.http.get("/api/v1/runs", headers=BEARER)
    assert response.status_code == 200
    assert "set-cookie" not in response.headers
    assert ws_status(served.ws_url, headers=BEARER) == 101


def test_query_token_once_then_cookie(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as browser:
        page = browser.get(f"/?token={TOKEN}")
        assert page.status_code == 200 and "<html" in page.text.lower()
        cookie = page.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE_NAME}=")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert TOKEN not in cookie  # the cookie holds an HMAC, not the token
        # The page's later fetches and its websocket carry only the cookie.
        assert browser.get("/app.js").status_code == 200
        assert browser.get("/api/v1/runs").status_code == 200
        value = browser.cookies[COOKIE_NAME]
    assert ws_status(served.ws_url, headers={"Cookie": f"{COOKIE_NAME}={value}"}) == 101
    assert ws_status(served.ws_url, headers={"Cookie": f"{COOKIE_NAME}=forged"}) == 401
    forged = {"Cookie": f"{COOKIE_NAME}=forged"}
    assert served.http.get("/api/v1/runs", headers=forged).status_code == 401


def test_websocket_needs_the_token(served: Served) -> None:
    assert ws_status(served.ws_url) == 401
    assert ws_status(served.ws_url + f"?token={TOKEN}") == 101


@pytest.mark.parametrize("token", [None, TOKEN])
def test_foreign_origin_is_refused(token: str | None) -> None:
    headers = BEARER if token else {}
    with Served(RunRegistry(), token=token) as served:
        assert ws_status(served.ws_url, headers, origin="https://evil.example") == 403
        assert ws_status(served.ws_url, headers, origin=served.url) == 101
        assert ws_status(served.ws_url, headers) == 101  # scripts send no Origin


def test_allowed_origins_setting() -> None:
    with Served(RunRegistry(), allowed_origins=["https://dash.example.org"]) as served:
        assert ws_status(served.ws_url, origin="https://dash.example.org") == 101


def test_token_never_reaches_the_access_log() -> None:
    with Served(RunRegistry(), token=TOKEN, log_level="info") as served, \
            log_of("uvicorn.access") as stream:
        assert served.http.get(f"/api/v1/runs?token={TOKEN}&x=1").status_code == 200
        wrong = httpx.get(served.url + "/api/v1/runs?token=wrong-guess", timeout=10)
        assert wrong.status_code == 401
    log = stream.getvalue()
    assert "/api/v1/runs?x=1" in log  # the access log is on, and says nothing of the token
    assert TOKEN not in log and "wrong-guess" not in log


def test_refused_websockets_leave_no_error_in_the_server_log() -> None:
    """uvicorn would log "ASGI callable returned without completing handshake" after
    each refusal; an operator reading the log should see only the refusal itself."""
    with Served(RunRegistry(), token=TOKEN, log_level="info") as served, \
            log_of("uvicorn.error") as stream:
        assert ws_status(served.ws_url) == 401
        assert ws_status(served.ws_url, BEARER, origin="https://evil.example") == 403
        assert ws_status(served.ws_url, BEARER) == 101
    log = stream.getvalue()
    assert '"WebSocket /ws" 401' in log and '"WebSocket /ws" 403' in log
    assert "handshake" not in log


HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}  # what a browser navigating sends


def test_a_browser_without_the_token_gets_a_login_page(served: Served) -> None:
    page = served.http.get("/?run=alice/lr3e-4", headers=HTML)
    assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
    assert '<input type="password" name="token"' in page.text
    assert '<input type="hidden" name="run" value="alice/lr3e-4">' in page.text  # kept
    assert "not right" not in page.text
    wrong = served.http.get("/?token=nope", headers=HTML)
    assert wrong.status_code == 401 and "That token is not right." in wrong.text
    # scripts still get JSON
    assert served.http.get("/api/v1/runs").json() == {"detail": "authentication required"}


def test_a_browser_logging_in_leaves_the_token_out_of_the_address(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10, headers=HTML) as browser:
        login = browser.get(f"/?run=x&token={TOKEN}", follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == "/?run=x"
        assert login.headers["set-cookie"].startswith(f"{COOKIE_NAME}=")
        page = browser.get(login.headers["location"])  # the cookie now logs it in
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert TOKEN not in str(page.url)
