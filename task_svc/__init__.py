"""opsmesh task service (opsmesh.task.v1.TaskService) and its worker, on NATS JetStream."""
