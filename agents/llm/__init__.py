"""The LLM planner's decision core: situations, the structured TPP decision, the guard, model clients."""
