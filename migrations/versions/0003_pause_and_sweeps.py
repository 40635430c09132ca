"""Pause/resume and sweeps: the pausing/paused job statuses, sweeps, and hyperparameters chosen
by `auto`.

- jobs.status may be 'pausing' (the run is asked to checkpoint and stop) or 'paused'.
- sweeps: one row per sweep (a base job and the hyperparameters it varies); jobs.sweep_id links
  each child job to it.
- jobs.auto_hyperparameters: the names of the hyperparameters the service chose because the
  request said `auto` (the values themselves are in jobs.hyperparameters).
- jobs.result_metrics: the metrics a succeeded run reported (eval loss, trainable parameters,
  peak memory, tokens/s, time): a sweep's comparison table reads them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 17:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_OLD_STATUSES = ('validating_files', 'queued', 'running', 'cancelling', 'succeeded', 'failed',
                 'cancelled')
_NEW_STATUSES = ('validating_files', 'queued', 'running', 'cancelling', 'pausing', 'paused',
                 'succeeded', 'failed', 'cancelled')


def _status_check(statuses: tuple[str, ...]) -> str:
    return f"status IN ({', '.join(repr(s) for s in statuses)})"


def upgrade() -> None:
    op.create_table(
        'sweeps',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('tenant_id', sa.String(length=40), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('base', sa.JSON(), nullable=False),
        sa.Column('parameters', sa.JSON(), nullable=False),
        sa.Column('metadata', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'],
                                name=op.f('fk_sweeps_tenant_id_tenants'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_sweeps')),
    )
    with op.batch_alter_table('sweeps') as batch:
        batch.create_index('ix_sweeps_tenant_id_id', ['tenant_id', 'id'], unique=False)

    with op.batch_alter_table('jobs') as batch:
        batch.drop_constraint(op.f('ck_jobs_status'), type_='check')
        batch.create_check_constraint(op.f('ck_jobs_status'), _status_check(_NEW_STATUSES))
        batch.add_column(sa.Column('sweep_id', sa.String(length=40), nullable=True))
        batch.add_column(sa.Column('auto_hyperparameters', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('result_metrics', sa.JSON(), nullable=True))
        batch.create_foreign_key(op.f('fk_jobs_sweep_id_sweeps'), 'sweeps', ['sweep_id'], ['id'],
                                 ondelete='CASCADE')
        batch.create_index('ix_jobs_sweep_id_id', ['sweep_id', 'id'], unique=False)


def downgrade() -> None:
    # A paused job has no status to go back to before pausing existed: it is requeued.
    op.execute("UPDATE jobs SET status = 'queued' WHERE status = 'paused'")
    op.execute("UPDATE jobs SET status = 'running' WHERE status = 'pausing'")
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_sweep_id_id')
        batch.drop_constraint(op.f('fk_jobs_sweep_id_sweeps'), type_='foreignkey')
        batch.drop_column('result_metrics')
        batch.drop_column('auto_hyperparameters')
        batch.drop_column('sweep_id')
        batch.drop_constraint(op.f('ck_jobs_status'), type_='check')
        batch.create_check_constraint(op.f('ck_jobs_status'), _status_check(_OLD_STATUSES))
    with op.batch_alter_table('sweeps') as batch:
        batch.drop_index('ix_sweeps_tenant_id_id')
    op.drop_table('sweeps')
