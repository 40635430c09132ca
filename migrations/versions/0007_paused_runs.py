"""jobs.paused_runs: runs that ended at a pause, so a resume does not spend one of the job's
crash retries (attempts still counts every submission: run ids stay unique).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 21:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('paused_runs', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('paused_runs')
