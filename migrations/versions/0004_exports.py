"""Exports and offline blends: the operations table and its events; adapters a blend made.

- operations: one row per export (an adapter merged into its base, written as a full model) or
  offline blend (a new adapter from weighted adapters), run as a Ray Job like a fine-tune.
- operation_events: their progress, as job_events are a job's.
- adapters.job_id becomes nullable: a blended adapter was trained by no job.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 18:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'operations',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('tenant_id', sa.String(length=40), nullable=False),
        sa.Column('kind', sa.String(length=8), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('adapter_id', sa.String(length=200), nullable=True),
        sa.Column('base_model_id', sa.String(length=200), nullable=False),
        sa.Column('method', sa.String(length=16), nullable=False),
        sa.Column('request', sa.JSON(), nullable=False),
        sa.Column('result_adapter_id', sa.String(length=200), nullable=True),
        sa.Column('key_prefix', sa.String(length=500), nullable=False),
        sa.Column('files', sa.JSON(), nullable=True),
        sa.Column('error_code', sa.String(length=64), nullable=True),
        sa.Column('error_message', sa.Text(), nullable=True),
        sa.Column('attempts', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.Column('updated_at', sa.BigInteger(), nullable=False),
        sa.Column('started_at', sa.BigInteger(), nullable=True),
        sa.Column('finished_at', sa.BigInteger(), nullable=True),
        sa.CheckConstraint("kind IN ('export', 'blend')", name=op.f('ck_operations_kind')),
        sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed')",
                           name=op.f('ck_operations_status')),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_operations_tenant_id_tenants'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_operations')),
    )
    with op.batch_alter_table('operations') as batch:
        batch.create_index('ix_operations_tenant_id_kind_id', ['tenant_id', 'kind', 'id'], unique=False)
        batch.create_index('ix_operations_status_id', ['status', 'id'], unique=False)
    op.create_table(
        'operation_events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('operation_id', sa.String(length=40), nullable=False),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.Column('level', sa.String(length=8), nullable=False),
        sa.Column('type', sa.String(length=16), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        sa.Column('data', sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(['operation_id'], ['operations.id'],
                                name=op.f('fk_operation_events_operation_id_operations'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_operation_events')),
    )
    with op.batch_alter_table('operation_events') as batch:
        batch.create_index('ix_operation_events_operation_id_id', ['operation_id', 'id'], unique=False)
    with op.batch_alter_table('adapters') as batch:
        batch.alter_column('job_id', existing_type=sa.String(length=40), nullable=True)


def downgrade() -> None:
    # Blended adapters have no job to belong to: they go with the operations that made them.
    op.execute("DELETE FROM adapters WHERE job_id IS NULL")
    with op.batch_alter_table('adapters') as batch:
        batch.alter_column('job_id', existing_type=sa.String(length=40), nullable=False)
    with op.batch_alter_table('operation_events') as batch:
        batch.drop_index('ix_operation_events_operation_id_id')
    op.drop_table('operation_events')
    with op.batch_alter_table('operations') as batch:
        batch.drop_index('ix_operations_status_id')
        batch.drop_index('ix_operations_tenant_id_kind_id')
    op.drop_table('operations')
