"""The scheduler's view of the cluster, recorded for the admin API (GET /v1/admin/cluster).

Only the scheduler asks Ray for capacity (it holds the Ray address and token); the API process
holds neither, so the leader writes what it last saw to one row and the API reads that row,
with its age. A write happens when the numbers change, and at least every REFRESH_S so the
age stays an honest "last seen" even while nothing changes.
"""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from service.db.models import ClusterStatus
from service.db.session import session_scope
from service.launcher import ClusterResources
from service.scheduling.policy import Capacity

ROW_ID = 1
REFRESH_S = 15.0


class ClusterRecorder:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions
        self._last: tuple[tuple[float, ...], float] | None = None  # (numbers, written at)

    def record(self, res: ClusterResources, *, training: Capacity, now: float) -> None:
        numbers = (res.total.cpus, res.total.gpus, res.available.cpus, res.available.gpus,
                   training.cpus, training.gpus)
        if self._last is not None and self._last[0] == numbers and now - self._last[1] < REFRESH_S:
            return
        with session_scope(self._sessions) as s:
            s.merge(ClusterStatus(id=ROW_ID, total_cpus=numbers[0], total_gpus=numbers[1],
                                  available_cpus=numbers[2], available_gpus=numbers[3],
                                  training_cpus=numbers[4], training_gpus=numbers[5], observed_at=int(now)))
        self._last = (numbers, now)


def latest(session: Session) -> ClusterStatus | None:
    return session.get(ClusterStatus, ROW_ID)
