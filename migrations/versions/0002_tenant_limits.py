"""Tenant compute limits: GPUs/CPUs per job, concurrent GPU/CPU share, job wall-clock.

All nullable: an existing tenant keeps only the cluster's and the service's own limits until
the admin sets its own.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 14:45:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_COLUMNS = (
    ('max_gpus_per_job', sa.Double()),
    ('max_cpus_per_job', sa.Double()),
    ('max_concurrent_gpus', sa.Double()),
    ('max_concurrent_cpus', sa.Double()),
    ('max_job_wall_clock_s', sa.BigInteger()),
)


def upgrade() -> None:
    with op.batch_alter_table('tenants') as batch:
        for name, type_ in _COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('tenants') as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
