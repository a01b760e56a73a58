"""The standing benchmark of the text-generation service; run it with `./bench/run.sh` (see cli.py)."""
