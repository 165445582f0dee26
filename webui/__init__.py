"""Serves the built web client (ui/dist) behind the edge: hashed assets cached for good,
index.html for every client route, and the headers that keep tokens in the page safe."""
