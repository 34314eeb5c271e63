"""one email_key index: unique, with pattern ops

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 16:50:00.000000

The unique constraint on subscribers.email_key and the varchar_pattern_ops index for prefix
search were two indexes on one column; a unique index with pattern ops does both jobs.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The new index is built before the old ones go, so uniqueness holds throughout.
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_subscribers_email_key"),
            ["email_key"],
            unique=True,
            postgresql_ops={"email_key": "varchar_pattern_ops"},
        )
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_subscribers_email_key_pattern",
            postgresql_ops={"email_key": "varchar_pattern_ops"},
        )
        batch_op.drop_constraint(batch_op.f("uq_subscribers_email_key"), type_="unique")


def downgrade() -> None:
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.create_unique_constraint(batch_op.f("uq_subscribers_email_key"), ["email_key"])
        batch_op.create_index(
            "ix_subscribers_email_key_pattern",
            ["email_key"],
            unique=False,
            postgresql_ops={"email_key": "varchar_pattern_ops"},
        )
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.drop_index(
            batch_op.f("ix_subscribers_email_key"),
            postgresql_ops={"email_key": "varchar_pattern_ops"},
        )
