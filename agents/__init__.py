"""Agent processes that join the physics layer and the bus: dose engine, evaluator, DRL advisor, LLM planner."""
