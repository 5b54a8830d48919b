"""The tracking store: the team server, replaying spools into it, comparing runs, exporting
metrics."""
