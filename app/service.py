"""What the app holds for its whole life: the Scorer (loaded once), the app run record, the batcher.

An upload's journey: streamed to a temporary file (app/uploads.py) -> answered from the record
when its sha256 was scored by this model before -> otherwise joined to the next batch -> one
`Scorer.score` call for the batch -> per-study files and the batch's part written -> answered.
The temporary file is removed either way; the upload itself is never kept.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from cxr.core.config import Params
from tasks.scoring.scorer import Scorer
from app.batching import Batcher
from app.record import AppRecord
from app.uploads import Upload
from app.views import scrub


class AppService:
    def __init__(self, params: Params, *, models_dir: Path | None = None):
        self.params = params
        self.scorer = Scorer.load(params, models_dir=models_dir)
        self.store = params.app_store()
        self.record = AppRecord(self.store, self.scorer.digest, pictures=params.app.store_pixels)
        self.batcher = Batcher(self._score_batch, params.app.batch_window_ms / 1000.0, params.score.batch_size)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix="cxr-app-uploads-"))
        self._inflight: dict[str, asyncio.Future] = {}

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.record.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    # ------------------------------------------------------------------ scoring

    async def score(self, upload: Upload) -> tuple[dict, bool]:
        """The per-study JSON facts of `upload`, and whether they came from the record."""
        try:
            if upload.size == 0:
                return self._refused(upload, "empty file"), False
            known = self.record.lookup(upload.sha256)
            if known is not None:
                return known, True
            # The same content uploaded twice at once is scored once: the second waits on the first.
            pending = self._inflight.get(upload.sha256)
            if pending is not None:
                return await asyncio.shield(pending), True
            future = asyncio.get_running_loop().create_future()
            self._inflight[upload.sha256] = future
            try:
                facts = await self.batcher.submit(upload)
                future.set_result(facts)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody logs it twice
                raise
            finally:
                self._inflight.pop(upload.sha256, None)
            return facts, False
        finally:
            upload.path.unlink(missing_ok=True)

    def _score_batch(self, uploads: list[Upload]) -> list[dict]:
        """One forward pass for the batch (worker thread); the record written before answering."""
        studies = self.scorer.score([(u.sha256, u.path) for u in uploads], self.record.run_id)
        for upload, study in zip(uploads, studies):
            # The row names the upload as its client did: the temporary path is no one's business.
            study.row["source_path"] = upload.filename
            if study.row.get("reason"):
                # The loader's message may name the temporary file: name the client's file instead.
                study.row["reason"] = scrub(study.row["reason"].replace(str(upload.path), upload.filename))
        return self.record.add(self.scorer, studies)

    def _refused(self, upload: Upload, reason: str) -> dict:
        return {"study_id": upload.sha256, "source_path": upload.filename, "sha256": upload.sha256,
                "model_digest": self.scorer.digest, "status": "rejected", "reason": reason}
