from behaviorlm.cli import app

app(prog_name="behaviorlm")
