"""opsmesh edge info: reflection for every public service and per-service health, for the edge."""
