from levers.cli.app import app

app(prog_name="levers")
