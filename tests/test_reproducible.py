"""The committed dvc.lock is what the committed code and params produce.

A fresh clone has no data, so `dvc status` reports every data dependency and output as
missing ("deleted", "not in cache"): that is expected. What it must never report is a
dependency that IS in the repository (code, params, the `models/` folder) with another hash
than the lock records, or a changed command: then `dvc repro` would rebuild with other code
than the lock's, the demo figures would move and `make demo` would rewrite dvc.lock. This
check takes about a second; a full `dvc repro` takes minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from tests.conftest import ROOT, VENV_BIN


def _tracked_copy(dest):
    """The repository's tracked files as they are in the work tree (what a commit would hold)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def stale_entries(status: dict) -> list[str]:
    """What `dvc status --json` says beyond missing data: each as 'stage: what'."""
    stale = []
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):
                stale.append(f"{stage}: {change}")
                continue
            for kind, detail in change.items():
                if kind == "changed outs":
                    continue  # outputs are not in a fresh clone; that is not staleness
                if kind == "changed deps" and isinstance(detail, dict):
                    stale += [f"{stage}: {path} {state}" for path, state in detail.items() if state != "deleted"]
                else:
                    stale.append(f"{stage}: {kind} {detail}")
    return stale


def test_stale_entries_tell_missing_data_from_changed_code():
    status = {"ingest": [{"changed deps": {"data/raw/a.csv": "deleted"}}, {"changed outs": {"data/x": "not in cache"}}],
              "train": [{"changed deps": {"models": "modified", "params.yaml": {"seed": "modified"}}}],
              "evaluate": ["changed command"]}
    assert stale_entries(status) == ["train: models modified", "train: params.yaml {'seed': 'modified'}",
                                     "evaluate: changed command"]


def test_committed_dvc_lock_matches_the_code_and_params(tmp_path):
    clone = _tracked_copy(tmp_path / "clone")
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)  # DVC reads its config inside a git repository
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    result = subprocess.run([str(VENV_BIN / "dvc"), "status", "--json"], cwd=clone, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stale = stale_entries(json.loads(result.stdout or "{}"))
    assert not stale, ("dvc.lock is stale with respect to the committed code/params; run `make demo` and commit "
                       "dvc.lock (and the README's demo figures): " + "; ".join(stale))
