"""opsmesh session service: chat sessions in Redis (opsmesh.session.v1.SessionService)."""
