"""AIOps agents: a system prompt, a declared tool set and limits, run through the model's tool calls."""
