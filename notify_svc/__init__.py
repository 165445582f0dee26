"""opsmesh notification service: email templates and delivery (opsmesh.notify.v1)."""
