"""DRL advisor: planning environment, policy training, and the TPP knowledge it publishes (no bus here)."""
