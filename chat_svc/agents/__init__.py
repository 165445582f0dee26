"""AIOps agents: a system prompt, a tool set and limits each, run through model tool calls."""
