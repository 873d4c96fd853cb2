from tidal.cli import app

app(prog_name="tidal")
