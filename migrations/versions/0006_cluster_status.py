"""The scheduler's last view of the cluster (cluster_status, one row) for the admin API, which
never talks to Ray itself.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 18:40:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'cluster_status',
        sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
        *(sa.Column(name, sa.Double(), nullable=False) for name in (
            'total_cpus', 'total_gpus', 'available_cpus', 'available_gpus', 'training_cpus', 'training_gpus')),
        sa.Column('observed_at', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_cluster_status')),
    )


def downgrade() -> None:
    op.drop_table('cluster_status')
