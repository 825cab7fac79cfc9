from levers.cli import app

app(prog_name="levers")
