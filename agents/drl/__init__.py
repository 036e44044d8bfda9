"""DRL advisor: planning environment, policy training, and the TPP knowledge it publishes (no bus here).

The shipped artifacts live in ``assets/`` beside this file; this is their one home.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "dqn_prostate.pt"
DEFAULT_KNOWLEDGE = ASSETS / "knowledge_prostate.json"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (the checkpoint's identity in knowledge and advice messages)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
