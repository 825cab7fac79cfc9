"""The `levers` command.

One Typer app, the console that prints, and the commands that need more than one call.
"""
