"""The installed `newsletter` command, run as ops run it, on the embedded SQLite default."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from tests.conftest import free_port

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))


def cli_env(data_dir: Path) -> dict[str, str]:
    """Only the data directory is set: everything else is the embedded default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env["NEWSLETTER_DATA_DIR"] = str(data_dir)
    return env


async def newsletter(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [NEWSLETTER, *args],
        env=cli_env(data_dir),
        cwd=data_dir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
async def embedded_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process over the same data directory the commands used."""
    app = create_app(Settings(data_dir=tmp_path, run_worker=False))
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http
    finally:
        await app.state.db.dispose()


async def test_ops_commands_on_the_embedded_default(tmp_path: Path) -> None:
    assert "Database at head" in ok(await newsletter(tmp_path, "migrate"))
    assert (tmp_path / "newsletter.db").exists()

    created = ok(
        await newsletter(
            tmp_path,
            "newsletters",
            "create",
            "--slug",
            "news",
            "--name",
            "News",
            "--opt-in",
            "single",
        )
    )
    assert "news" in created

    listed = ok(await newsletter(tmp_path, "newsletters", "list"))
    [row] = [line.split() for line in listed.splitlines() if line.startswith("news ")]
    assert row == ["news", "single", "0", "0", "News"]

    duplicate = await newsletter(
        tmp_path, "newsletters", "create", "--slug", "news", "--name", "Again"
    )
    assert duplicate.returncode != 0
    assert "news" in duplicate.stderr and "exists" in duplicate.stderr
    assert "Traceback" not in duplicate.stderr + duplicate.stdout
    listed_again = ok(await newsletter(tmp_path, "newsletters", "list"))
    assert "Again" not in listed_again


async def test_read_key_from_the_cli_works_against_the_admin_api(
    tmp_path: Path, embedded_client: httpx.AsyncClient
) -> None:
    ok(await newsletter(tmp_path, "migrate"))
    ok(await newsletter(tmp_path, "newsletters", "create", "--slug", "news", "--name", "News"))
    output = ok(await newsletter(tmp_path, "keys", "create", "--name", "ops", "--scope", "read"))
    key = output.rstrip("\n").splitlines()[-1]
    assert key and key == key.strip() and " " not in key

    auth = {"authorization": f"Bearer {key}"}
    listed = await embedded_client.get("/v1/admin/newsletters", headers=auth)
    assert listed.status_code == 200, listed.text
    assert [n["slug"] for n in listed.json()["items"]] == ["news"]

    wrong = await embedded_client.get(
        "/v1/admin/newsletters", headers={"authorization": f"Bearer {key}x"}
    )
    assert wrong.status_code == 401
    write = await embedded_client.post(
        "/v1/admin/newsletters", json={"slug": "other", "name": "Other"}, headers=auth
    )
    assert write.status_code == 403


async def test_outbox_status_counts_queued_mail(
    tmp_path: Path, embedded_client: httpx.AsyncClient
) -> None:
    ok(await newsletter(tmp_path, "migrate"))
    ok(
        await newsletter(
            tmp_path,
            "newsletters",
            "create",
            "--slug",
            "news",
            "--name",
            "News",
            "--opt-in",
            "single",
        )
    )
    before = dict(
        line.split() for line in ok(await newsletter(tmp_path, "outbox", "status")).splitlines()
    )
    assert before == {"queued": "0", "sending": "0", "sent": "0", "dead": "0"}

    answer = await embedded_client.post(
        "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": ["news"]}
    )
    assert answer.status_code == 200, answer.text

    after = dict(
        line.split() for line in ok(await newsletter(tmp_path, "outbox", "status")).splitlines()
    )
    assert after == {"queued": "1", "sending": "0", "sent": "0", "dead": "0"}


CONFIRM_LINK = re.compile(r"https?://[^/\s\"'<>]+(/confirm/[A-Za-z0-9_-]+)")


async def test_serve_demo_takes_a_newcomer_from_sign_up_to_confirmed(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [NEWSLETTER, "serve", "--demo", "--port", str(port)],
            env=cli_env(tmp_path),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def get_when_up(path: str) -> httpx.Response:
                for _ in range(600):
                    assert process.poll() is None, log_path.read_text()
                    try:
                        return await http.get(path)
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
                pytest.fail(f"the server never answered\n{log_path.read_text()}")

            assert (await get_when_up("/healthz")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text

            signed_up = await http.post(
                "/v1/subscriptions",
                json={"email": "newcomer@example.com", "newsletters": ["demo"]},
            )
            assert signed_up.status_code == 202, signed_up.text

            confirm_path = None
            for _ in range(150):
                mailbox = await http.get("/dev/mailbox")
                assert mailbox.status_code == 200
                found = CONFIRM_LINK.search(mailbox.text)
                if found:
                    confirm_path = found.group(1)
                    break
                await asyncio.sleep(0.1)
            assert confirm_path, f"no confirmation mail arrived\n{log_path.read_text()}"
            assert "newcomer@example.com" in mailbox.text
            # The link points at the port this server listens on, not a default.
            assert f"http://127.0.0.1:{port}{confirm_path}" in mailbox.text

            page = await http.get(confirm_path)
            assert page.status_code == 200
            assert "Confirm" in page.text
            confirmed = await http.post(confirm_path)
            assert confirmed.status_code == 200
            assert "Your subscription is confirmed" in confirmed.text

        process.terminate()
        # uvicorn shuts down cleanly, then exits by the signal it was sent.
        code = await asyncio.to_thread(process.wait, 30)
        assert code in (0, -signal.SIGTERM), log_path.read_text()
        assert "Application shutdown complete" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
