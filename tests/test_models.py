"""Column types: what the service binds is what SQLAlchemy's own types would bind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.sqlite import DATETIME

from service.models import UTCDateTime

MOMENTS = [
    datetime(2026, 11, 25, 14, 38, 0, tzinfo=UTC),  # no microseconds: still six digits
    datetime(2026, 11, 25, 14, 38, 0, 123456, tzinfo=UTC),
    datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),  # a year below 1000 is zero-padded
    datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-8))),
]


def test_sqlite_binding_matches_sqlalchemys_datetime_text() -> None:
    dialect = sqlite.dialect()
    fast = UTCDateTime().bind_processor(dialect)
    generic = DATETIME().bind_processor(dialect)
    assert fast is not None and generic is not None
    for moment in MOMENTS:
        expected = generic(moment.astimezone(UTC).replace(tzinfo=None))
        assert fast(moment) == expected
        assert fast(moment) == expected  # the remembered value answers the same
    assert fast(None) is None
    with pytest.raises(ValueError, match="naive"):
        fast(datetime(2026, 1, 1))
