"""`levers plan`: the capacity model, what-ifs of the file, and how a plan looks."""
