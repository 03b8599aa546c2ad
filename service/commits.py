"""Group commit: the commits that reach the store thread while it is writing go to the store together.

Streams that end together (a batch of Generate calls decoding in step) each make a final commit; written one
after another, each waits for its own fsync, so the last of 32 streams waited for 32 of them. Here a commit
queues (worker.JobGroup), and the store thread takes everything queued at once: in one transaction where the
store can (`commit_many`: SQLite), one at a time otherwise. A commit adds no wait when the store thread is idle,
and each caller still hears its own outcome only after the write that holds it is durable.
"""

from kvshard.service.worker import JobGroup, SerialExecutor


class CommitGroup:
    def __init__(self, store, io: SerialExecutor):
        self.store = store
        self._group = JobGroup(io, self._write_many, job="commit")

    async def commit(self, record, deltas, lease, tenant_quota: int) -> None:
        """store.commit(record, deltas, lease, tenant_quota), grouped with the commits queued beside it. If the
        caller is cancelled meanwhile, the commit is still written (or refused) with its group."""
        await self._group.run((record, deltas, lease, tenant_quota))

    def _write_many(self, commits: list[tuple]) -> list[BaseException | None]:
        """(store thread) Each commit's outcome: None when it landed, else the error its caller raises."""
        if len(commits) > 1 and hasattr(self.store, "commit_many"):
            try:
                return self.store.commit_many(commits)
            except Exception as error:  # noqa: BLE001 (the transaction failed: nothing of it landed)
                return [error] * len(commits)
        outcomes = []
        for commit in commits:
            try:
                self.store.commit(*commit)
            except Exception as error:  # noqa: BLE001 (handed to its own caller)
                outcomes.append(error)
            else:
                outcomes.append(None)
        return outcomes
