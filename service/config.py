"""Settings: the only place the environment is read."""

from __future__ import annotations

import ipaddress
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal
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
    mail_rate_limit: float = Field(
        default=0.0, description="Most messages a second one worker sends (0 = no limit)."
    )
    mail_timeout: float = Field(default=30.0, description="Seconds an SMTP exchange may take.")
    check_deliverability: bool = Field(
        default=False, description="Check the address's domain has MX (or A) records."
    )
    confirmation_ttl: timedelta = Field(
        default=timedelta(days=7),
        description="How long a confirmation link works (seconds or ISO 8601 duration).",
    )
    confirm_on_get: bool = Field(
        default=False, description="Let GET /confirm/{token} confirm without the POST."
    )
    confirmation_mail_interval: timedelta = Field(
        default=timedelta(minutes=5),
        description="At most one confirmation (or already-subscribed) mail per address this often.",
    )
    confirmation_mail_daily_cap: int = Field(
        default=5, description="At most this many such mails per address per day."
    )
    max_body_bytes: int = Field(default=64 * 1024, description="Largest sign-up body (413 above).")
    request_timeout: float = Field(
        default=15.0,
        ge=0,
        description="Seconds a request body may take to arrive, plus one per 500 bytes "
        "received; slower is answered 408 (slow-loris defence). 0 = no limit.",
    )
    max_attributes_bytes: int = Field(
        default=4 * 1024, description="Largest `attributes` object, as JSON bytes."
    )
    max_newsletters_per_signup: int = Field(
        default=20, description="Most newsletters one sign-up may name."
    )
    dev_mailbox: bool | None = Field(
        default=None, description="Show /dev/mailbox; default: on when mail goes to a Maildir."
    )
    run_worker: bool = Field(default=True, description="Run the delivery worker inside serve.")
    worker_batch_size: int = Field(
        default=100, description="Outbox rows one worker claims at once."
    )
    worker_smtp_connections: int = Field(
        default=8,
        description=(
            "SMTP connections one worker sends over at once (lower it for a relay that "
            "allows fewer)."
        ),
    )
    worker_poll_interval: float = Field(
        default=1.0, description="Seconds an idle worker waits before looking again."
    )
    worker_lease: timedelta = Field(
        default=timedelta(minutes=2),
        description="How long claimed rows stay a worker's; after that another may take them.",
    )
    worker_max_attempts: int = Field(
        default=10, description="Attempts before a message is dead (`newsletter outbox retry`)."
    )
    worker_backoff_base: float = Field(
        default=5.0, description="Seconds before the first retry; doubles per attempt, jittered."
    )
    worker_backoff_max: float = Field(default=3600.0, description="Longest wait between retries.")
    purge_pending_after: timedelta = Field(
        default=timedelta(days=30),
        description="The worker deletes sign-ups still pending after this long (0 = never).",
    )
    webhook_timeout: float = Field(default=10.0, description="Seconds per webhook call.")
    db_pool_size: int = Field(default=10, description="PostgreSQL connections kept per process.")
    db_max_overflow: int = Field(
        default=10, description="Extra PostgreSQL connections allowed under load."
    )
    import_connections: int = Field(
        default=2,
        ge=1,
        le=16,
        description=(
            "PostgreSQL connections a CSV import writes its chunks on at once (SQLite: 1)."
        ),
    )
    sqlite_pool_size: int = Field(
        default=1, description="SQLite connections per process (it has one writer)."
    )
    signup_batching: bool = Field(
        default=True, description="Group concurrent sign-ups into one transaction."
    )
    signup_batch_size: int = Field(
        default=64, description="Most sign-ups committed in one transaction."
    )
    signup_batch_consumers: int = Field(
        default=0,
        ge=0,
        description=(
            "Sign-up batches a process runs at once (0 = 2 on PostgreSQL, where one batch is "
            "gathered while another is written; 1 on SQLite, whose writers take turns)."
        ),
    )
    signup_batch_wait_ms: float = Field(
        default=3.0,
        ge=0,
        description=(
            "Under load, how long a sign-up batch may wait for its share of the sign-ups in "
            "flight (0 = never wait; an idle service never waits)."
        ),
    )
    db_echo: bool = Field(
        default=False,
        description="Log every SQL statement (debugging). The sign-up batch runs on the "
        "driver directly (service/driver.py) and is not logged.",
    )
    bounce_webhook_secret: str = Field(
        default="",
        description="Shared secret of POST /v1/hooks/bounces (Bearer, Basic or ?token=), for"
        " providers; an admin API key is always accepted too.",
    )
    bounce_sns_autoconfirm: bool = Field(
        default=False,
        description="Fetch the SubscribeURL of an Amazon SNS subscription confirmation.",
    )
    soft_bounce_threshold: int = Field(
        default=3, ge=1, description="Soft bounces of one address that count as a hard bounce."
    )
    inbound_host: str = Field(default="127.0.0.1", description="Where `newsletter inbound` binds.")
    inbound_port: int = Field(default=2525, description="Port of `newsletter inbound`.")
    verp: bool = Field(
        default=False,
        description="Send with a signed per-message envelope sender (VERP) so bounces name the "
        "message; only where `newsletter inbound` receives the mail of MAIL_FROM's domain.",
    )
    log_level: str = Field(
        default="info", description="debug, info, warning; addresses are logged only at debug."
    )
    json_logs: bool = Field(default=True, description="One JSON object per log line.")
    opentelemetry: bool = Field(
        default=False,
        description="FastAPI's own OpenTelemetry traces, metrics and logs, to the providers an "
        "OpenTelemetry SDK sets up in the process (off: no per-request provider checks; "
        "/metrics is Prometheus either way).",
    )
    # Abuse resistance of the public sign-up (docs/abuse.md).
    signup_rate_limit: str = Field(
        default="60/minute;300/hour",
        description="Sign-ups per client IP, as `limits` strings separated by ';' "
        "(e.g. 20/minute;200/hour); empty = no limit. IPv6 clients count per /64.",
    )
    rate_limit_storage: Literal["auto", "memory", "database", "redis"] = Field(
        default="auto",
        description="Where rate-limit counters live; auto = redis when REDIS_URL is set, else "
        "memory for SQLite (one process) and a database table for PostgreSQL.",
    )
    redis_url: str = Field(
        default="", description="redis://host:port/db shared by every API process (rate limits)."
    )
    rate_limit_sync_seconds: float = Field(
        default=1.0,
        ge=0,
        description="Database storage: how often a process writes its counts and reads the "
        "shared ones; 0 = write every request before answering (exact, slower).",
    )
    rate_limit_key_prefix: str = Field(
        default="newsletter", description="Prefix of the rate-limit keys in Redis."
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated IPs/CIDRs of reverse proxies whose X-Forwarded-For is "
        "believed; the client is the right-most address not in this set.",
    )
    min_fill_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Minimum seconds between the signed form_ts a form carries and its "
        "sign-up; younger, forged or missing = a bot, answered like the honeypot. 0 = off.",
    )
    challenge_verify_url: str = Field(
        default="",
        description="Siteverify URL of a Turnstile/hCaptcha-style challenge; with "
        "CHALLENGE_SECRET set, every sign-up must carry a passing challenge_token.",
    )
    challenge_secret: str = Field(default="", description="Secret sent to CHALLENGE_VERIFY_URL.")
    challenge_site_key: str = Field(
        default="", description="Public site key of the challenge widget on our form pages."
    )
    challenge_widget_class: str = Field(
        default="cf-turnstile",
        description="CSS class of the widget's placeholder (cf-turnstile, h-captcha).",
    )
    challenge_script_url: str = Field(
        default="", description="Script of the challenge widget, loaded by our form pages."
    )
    challenge_timeout: float = Field(
        default=5.0, gt=0, description="Seconds to wait for the challenge verifier."
    )
    reject_disposable: bool = Field(
        default=True, description="Refuse addresses at disposable (throw-away) mail domains."
    )
    disposable_domains_file: Path | None = Field(
        default=None,
        description="Extra disposable domains, one per line (# comments); re-read when changed.",
    )
    suggest_domain_typos: bool = Field(
        default=True,
        description="Refuse near misses of popular mail domains (gmial.com) with a suggestion.",
    )
    dns_resolver: str = Field(
        default="",
        description="host:port ([v6]:port) of the DNS server for deliverability; empty = system.",
    )
    dns_timeout: float = Field(
        default=3.0, gt=0, description="Seconds a deliverability lookup may take, then pass."
    )

    @field_validator("secret_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("signup_rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str) -> str:
        if value.strip():
            from limits import parse_many

            parse_many(value)  # a typo fails at start, not on the first sign-up
        return value.strip()

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        scheme = urlsplit(value).scheme.split("+")[0]
        if value and scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("use sqlite:///path or postgresql://user@host:port/db")
        return value

    @field_validator("mail_url")
    @classmethod
    def _known_mail(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("smtp", "smtps", "maildir"):
            raise ValueError("use smtp://host:port, smtps://host:port or maildir:///path")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
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


def settings_table() -> str:
    """The configuration table of the README, from the fields above."""
    rows = ["| variable | default | what it does |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = "" if field.default_factory is not None else field.default
        if isinstance(default, timedelta):
            default = int(default.total_seconds())
        shown = "" if default in ("", None) else f"`{default}`"
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `NEWSLETTER_{name.upper()}` | {shown} | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
