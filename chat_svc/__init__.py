"""opsmesh chat service: streams model answers into sessions (opsmesh.chat.v1.ChatService)."""
