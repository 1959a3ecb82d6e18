"""The experiment layer above ``fit``: trials of several sessions (seeds) analysed with SLM Lab's
metrics and an IQM with bootstrap intervals, their plots, and comparisons between trials."""
