"""Settings: the only place the environment is read."""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob of the service; `NEWSLETTER_<NAME>` in the environment sets one."""

    model_config = SettingsConfigDict(env_prefix="NEWSLETTER_", extra="ignore")

    data_dir: Path = Field(
        default=Path("var"),
        description="Where the embedded default keeps its SQLite file, secret key and Maildir.",
    )
    database_url: str = Field(
        default="",
        description="sqlite:///path or postgresql://user@host:port/db; empty = SQLite in data_dir.",
    )
    base_url: str = Field(default="http://127.0.0.1:8000", description="Absolute URL of links.")
    secret_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated; the first signs, all verify. Generated for embedded SQLite.",
    )
    mail_url: str = Field(
        default="", description="smtp://, smtps:// or maildir:///path; empty = Maildir in data_dir."
    )
    mail_from: str = Field(default="newsletter@localhost", description="Default sender address.")
    mail_timeout: float = 30.0
    check_deliverability: bool = False
    confirmation_ttl: timedelta = Field(default=timedelta(days=7))
    confirm_on_get: bool = Field(
        default=False, description="Let GET /confirm/{token} confirm without the POST."
    )
    confirmation_mail_interval: timedelta = Field(default=timedelta(minutes=5))
    confirmation_mail_daily_cap: int = 5
    max_body_bytes: int = 64 * 1024
    max_attributes_bytes: int = 4 * 1024
    max_newsletters_per_signup: int = 20
    dev_mailbox: bool | None = Field(
        default=None, description="Show /dev/mailbox; default: on when mail goes to a Maildir."
    )
    run_worker: bool = Field(default=True, description="Run the delivery worker inside serve.")
    worker_batch_size: int = 100
    worker_poll_interval: float = 1.0
    worker_lease: timedelta = Field(default=timedelta(minutes=2))
    worker_max_attempts: int = 10
    worker_backoff_base: float = 5.0
    worker_backoff_max: float = 3600.0
    db_pool_size: int = 10
    db_max_overflow: int = 10
    sqlite_pool_size: int = 1
    signup_batching: bool = Field(
        default=True, description="Group concurrent sign-ups into one transaction."
    )
    signup_batch_size: int = 64
    signup_batch_consumers: int = 1
    db_echo: bool = False

    @field_validator("secret_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator(
        "confirmation_ttl", "confirmation_mail_interval", "worker_lease", mode="before"
    )
    @classmethod
    def _seconds_as_timedelta(cls, value: object) -> object:
        if isinstance(value, str) and value.isdigit():
            return timedelta(seconds=int(value))
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'newsletter.db'}"

    @property
    def resolved_mail_url(self) -> str:
        return self.mail_url or f"maildir://{(self.data_dir / 'maildir').resolve()}"

    @property
    def maildir_path(self) -> Path | None:
        url = self.resolved_mail_url
        if not url.startswith("maildir://"):
            return None
        return Path(url.removeprefix("maildir://"))

    @property
    def show_dev_mailbox(self) -> bool:
        if self.dev_mailbox is not None:
            return self.dev_mailbox
        return self.maildir_path is not None

    @property
    def site_domain(self) -> str:
        return urlsplit(self.base_url).hostname or "localhost"

    @property
    def templates_dir(self) -> Path:
        return PROJECT_ROOT / "templates"

    def with_secret_keys(self) -> Settings:
        """Return settings that carry signing keys, creating the embedded one if needed.

        Production (PostgreSQL) must configure NEWSLETTER_SECRET_KEYS: a key generated on one
        host would not verify links on another.
        """
        if self.secret_keys:
            return self
        if not self.is_sqlite:
            raise RuntimeError("NEWSLETTER_SECRET_KEYS must be set when the database is not SQLite")
        key_file = self._sqlite_dir() / "secret_key"
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
        return self.model_copy(update={"secret_keys": [key_file.read_text().strip()]})

    def _sqlite_dir(self) -> Path:
        path = self.resolved_database_url.split("///", 1)[-1]
        if path in ("", ":memory:"):
            return self.data_dir
        return Path(path).parent


def load_settings() -> Settings:
    return Settings().with_secret_keys()
