"""``python -m negkd`` (also what ``accelerate launch -m negkd ...`` runs)."""

from negkd.cli import app

app(prog_name="negkd")
