"""Every chapter method as a job: jobs.method and adapters.method take ia3, adalora,
prefix_tuning, prompt_tuning and p_tuning besides lora and qlora (up to 16 characters).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 18:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_OLD = ('lora', 'qlora')
_NEW = ('lora', 'qlora', 'ia3', 'adalora', 'prefix_tuning', 'prompt_tuning', 'p_tuning')


def _method_check(methods: tuple[str, ...]) -> str:
    return f"method IN ({', '.join(repr(m) for m in methods)})"


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_constraint(op.f('ck_jobs_method'), type_='check')
        batch.alter_column('method', type_=sa.String(length=16), existing_type=sa.String(length=8),
                           existing_nullable=False)
        batch.create_check_constraint(op.f('ck_jobs_method'), _method_check(_NEW))
    with op.batch_alter_table('adapters') as batch:
        batch.alter_column('method', type_=sa.String(length=16), existing_type=sa.String(length=8),
                           existing_nullable=False)


def downgrade() -> None:
    # Jobs and adapters of the newer methods have no place in the older schema.
    op.execute(f"DELETE FROM adapters WHERE NOT ({_method_check(_OLD)})")
    op.execute(f"DELETE FROM jobs WHERE NOT ({_method_check(_OLD)})")
    with op.batch_alter_table('adapters') as batch:
        batch.alter_column('method', type_=sa.String(length=8), existing_type=sa.String(length=16),
                           existing_nullable=False)
    with op.batch_alter_table('jobs') as batch:
        batch.drop_constraint(op.f('ck_jobs_method'), type_='check')
        batch.alter_column('method', type_=sa.String(length=8), existing_type=sa.String(length=16),
                           existing_nullable=False)
        batch.create_check_constraint(op.f('ck_jobs_method'), _method_check(_OLD))
