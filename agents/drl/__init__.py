"""DRL advisor: planning environment, policy training, and the TPP knowledge it publishes (no bus here).

The shipped artifacts live in ``assets/`` beside this file; this is their one home.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "dqn_prostate.pt"
DEFAULT_KNOWLEDGE = ASSETS / "knowledge_prostate.json"
