"""`python -m eval.bench` is `python -m bench` (bench/__main__.py), kept under its older name."""
